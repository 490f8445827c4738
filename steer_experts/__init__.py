"""steer_experts: find the expert neurons of a language model for a concept, and steer generation with them.

The core modules follow the pipeline, in the order a newcomer should read them; none imports a later one:
errors -> words -> concepts -> models, units -> writing (concept sentences from a word) -> responses ->
expertise -> experts -> discovery (also from a word alone) ->
effects (what an expert writes) -> interventions -> steering (and the other steering methods: diffmean,
prompting; calibration chooses an expert operating point) -> model_card. ``hub`` is transport only and
serves every stage. ``evaluation/`` measures generations; ``lens/`` holds the ExpertLens analyses (similarity, ratings,
baselines, queries, organisation); ``atlas/`` writes a static website of concepts and their experts.
"""

import importlib

# Each public name and the module that defines it, in pipeline order. They are imported on first use
# (PEP 562), so that a command needing three stages does not pay for the rest: the evaluation stack
# (scikit-learn) alone is a second of every CLI start.
_EXPORTS = {
    "errors": ("SteerExpertsError", "CorruptFileError", "InvalidArgumentError", "OutputFolderError"),
    "concepts": ("Concept", "ConceptDataError", "ConceptSet"),
    "models": ("DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "ModelNotFoundError", "load_model"),
    "units": ("UnitSite", "locate_units", "register_unit_kind"),
    "responses": ("Responses", "collect_responses"),
    "expertise": ("Expertise", "compute_expertise"),
    "experts": ("ExpertSelection", "ExpertSet", "ModelMismatchError"),
    "discovery": ("discover", "discover_word", "discover_words", "WordNotUsableError"),
    "effects": ("promoting_scores", "word_effects"),
    "interventions": ("ExpertIntervention",),
    "steering": ("ExpertSteeredModel", "SteeredModel", "steer"),
    "diffmean": ("ResidualMeans", "residual_means", "steer_diffmean", "unit_shifts"),
    "prompting": ("steer_prompt",),
    "calibration": ("calibrate",),
    "hub": ("HubUnavailableError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'steer_experts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"
