"""steer_experts: find the expert neurons of a language model for a concept, and steer generation with them.

The core modules follow the pipeline, in the order a newcomer should read them; none imports a later one:
errors -> words -> concepts -> models, units -> responses -> expertise -> experts -> discovery ->
effects (what an expert writes) -> interventions -> steering (and the other steering methods: diffmean,
prompting; calibration chooses an expert operating point) -> model_card. ``hub`` is transport only and
serves every stage. ``evaluation/`` measures generations; ``lens/`` holds the ExpertLens analyses (similarity, ratings,
baselines, queries, writing concept data).
"""

from .errors import CorruptFileError, InvalidArgumentError, OutputFolderError, SteerExpertsError
from .concepts import Concept, ConceptDataError, ConceptSet
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, ModelNotFoundError, load_model
from .units import UnitSite, locate_units, register_unit_kind
from .responses import Responses, collect_responses
from .expertise import Expertise, compute_expertise
from .experts import ExpertSelection, ExpertSet, ModelMismatchError
from .discovery import discover
from .effects import promoting_scores, word_effects
from .interventions import ExpertIntervention
from .steering import ExpertSteeredModel, SteeredModel, steer
from .diffmean import ResidualMeans, residual_means, steer_diffmean, unit_shifts
from .prompting import steer_prompt
from .calibration import calibrate
from .hub import HubUnavailableError

__all__ = [
    "SteerExpertsError", "CorruptFileError", "InvalidArgumentError", "OutputFolderError",
    "Concept", "ConceptDataError", "ConceptSet",
    "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "ModelNotFoundError", "load_model",
    "UnitSite", "locate_units", "register_unit_kind",
    "Responses", "collect_responses",
    "Expertise", "compute_expertise",
    "ExpertSelection", "ExpertSet", "ModelMismatchError", "discover", "promoting_scores", "word_effects",
    "ExpertIntervention",
    "ExpertSteeredModel", "SteeredModel", "steer",
    "ResidualMeans", "residual_means", "steer_diffmean", "unit_shifts", "steer_prompt", "calibrate",
    "HubUnavailableError",
]
__version__ = "0.1.0"
