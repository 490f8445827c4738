"""steer_experts: find the expert neurons of a language model for a concept, and steer generation with them.

The modules follow the pipeline, in the order a newcomer should read them:
concepts -> models -> responses -> expertise -> experts -> interventions -> steering -> hub.
Other steering methods sit beside expert steering (diffmean, prompting), and
calibration chooses an expert operating point; evaluation/ measures generations.
"""

from .errors import CorruptFileError, InvalidArgumentError, OutputFolderError, SteerExpertsError
from .concepts import Concept, ConceptDataError, ConceptSet
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, ModelNotFoundError, load_model, locate_units, register_unit_kind
from .responses import Responses, collect_responses
from .expertise import Expertise, compute_expertise
from .experts import ExpertSelection, ExpertSet, ModelMismatchError, discover
from .interventions import ExpertIntervention
from .steering import ExpertSteeredModel, SteeredModel, steer
from .diffmean import ResidualMeans, residual_means, steer_diffmean
from .prompting import steer_prompt
from .calibration import calibrate
from .hub import HubUnavailableError

__all__ = [
    "SteerExpertsError", "CorruptFileError", "InvalidArgumentError", "OutputFolderError",
    "Concept", "ConceptDataError", "ConceptSet",
    "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "ModelNotFoundError", "load_model", "locate_units", "register_unit_kind",
    "Responses", "collect_responses",
    "Expertise", "compute_expertise",
    "ExpertSelection", "ExpertSet", "ModelMismatchError", "discover",
    "ExpertIntervention",
    "ExpertSteeredModel", "SteeredModel", "steer",
    "ResidualMeans", "residual_means", "steer_diffmean", "steer_prompt", "calibrate",
    "HubUnavailableError",
]
__version__ = "0.1.0"
