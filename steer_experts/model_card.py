"""The model card (README.md) of a saved steered model: what it steers, how, and how to load it."""

from __future__ import annotations

from .models import EMBEDDED_MODELS


def render_model_card(config: dict, repo_id: str | None = None) -> str:
    """The README.md of a saved steered model, from its ``steering.json`` contents.

    It names the base model and its fingerprint, the concepts and how each is
    steered, the expert selection, alpha, mode, AP statistics of the chosen
    experts, and how to load it (from ``repo_id`` when given).
    """
    base = config["base_model"]
    embedded = EMBEDDED_MODELS.get(base["name"])
    hub_base = embedded.hub_id if embedded else (base["name"] if base["name"].count("/") == 1 else None)
    if config.get("method", "experts") != "experts":
        return _baseline_card(config, hub_base, repo_id)
    spec = config["spec"]
    selection = next(f"{key} = {spec[key]}" for key in ("k", "tau", "per_layer") if spec[key] is not None)
    if spec.get("control"):
        selection += f" ({spec['control']} control units, seed {spec['seed']}, instead of experts)"
    concepts = ", ".join(config["concepts"])
    lines = [
        "---",
        "library_name: steer_experts",
        *([f"base_model: {hub_base}"] if hub_base else []),
        "tags: [steering, expert-units, pyvene]",
        "---",
        "",
        f"# {base['name']} steered by expert units: {concepts}",
        "",
        "This folder holds no model weights: it is an intervention on the MLP neurons (inputs of the "
        "down projection) of the base model below, made with `steer_experts` (self-conditioning, "
        "Suau et al. 2022) and stored as pyvene interventions.",
        "",
        f"- **Base model:** `{base['name']}`, fingerprint `{base['fingerprint']}` "
        "(loading onto any other model is refused)",
        f"- **Experts:** {selection}",
        f"- **Mode:** `{spec['mode']}`"
        + (f", value `{spec['value']}`" if spec["value"] else "")
        + f"; suppression mode `{spec['suppress']}`; alpha = {spec['alpha']:g}",
        f"- **Positions steered by default:** {spec['positions']}",
        f"- **Units claimed by more than one concept:** {config['contested_units']} "
        "(the concept with the higher AP for the unit wins; on a tie, the one named first)",
        "",
        "Each steered unit z becomes z + w (v - z) at every steered position: `set` uses w = alpha x strength "
        "and v = the expert's value under the concept; `dampen` (AurA) w = alpha x |strength| x 2 (AUROC - 0.5) "
        "and v = 0; `ablate` w = alpha x |strength| and v = 0 or the mean response on negatives.",
        "",
        "| concept | strength | units | AP min | AP median | AP max | weight range | target range |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in config["experts"]:
        strength = spec["concepts"][row["concept"]]
        if row["units"]:
            lines.append(
                f"| {row['concept']} | {strength:+g} | {row['units']} | {row['ap_min']:.3f} | "
                f"{row['ap_median']:.3f} | {row['ap_max']:.3f} | {row['weight_min']:.3g} .. {row['weight_max']:.3g} | "
                f"{row['target_min']:.3g} .. {row['target_max']:.3g} |")
        else:
            lines.append(f"| {row['concept']} | {strength:+g} | 0 | | | | | |")
    lines += _loading_section(base, repo_id)
    return "\n".join(lines)


def _baseline_card(config: dict, hub_base: str | None, repo_id: str | None) -> str:
    base = config["base_model"]
    what = {"diffmean": f"DiffMean: the unit direction mean(positives) - mean(negatives) of the residual stream "
                        f"at layer {config.get('layer')}, added at every position with factor "
                        f"{config.get('factor', 0):g} x the layer's median token norm ({config.get('norm', 0):.4g}).",
            "prompt": f"an instruction in the chat template: {config.get('instruction')!r}."}.get(config["method"], "")
    lines = [
        "---", "library_name: steer_experts", *([f"base_model: {hub_base}"] if hub_base else []),
        f"tags: [steering, {config['method']}]", "---", "",
        f"# {base['name']} steered toward {config.get('concept')} ({config['method']})", "",
        f"This folder holds no model weights. It steers the base model below with {what}", "",
        f"- **Base model:** `{base['name']}`, fingerprint `{base['fingerprint']}` "
        "(loading onto any other model is refused)",
    ]
    return "\n".join(lines + _loading_section(base, repo_id, with_pyvene=config["method"] != "prompt"))


def _loading_section(base: dict, repo_id: str | None, with_pyvene: bool = True) -> list[str]:
    lines = [
        "",
        "## Load it",
        "",
        "```python",
        "from steer_experts.models import load_model",
        "from steer_experts.steering import SteeredModel",
        f"steered = SteeredModel.from_pretrained({repo_id or '<this folder or repo id>'!r}, "
        f"load_model({base['name']!r}))",
        "print(steered.complete(\"Once upon a time\", max_new_tokens=30, do_sample=True, seed=0))",
        "```",
        "",
    ]
    if not with_pyvene:
        return lines + ["Files: `steering.json` + `steering.safetensors` (read by `steer_experts`, no pickle).", ""]
    return lines + [
        "With pyvene alone (the intervention class still comes from `steer_experts`): "
        "`pyvene.IntervenableModel.load(folder + \"/pyvene\", hf_model)`.",
        "",
        "Files: `steering.json` + `steering.safetensors` (read by `steer_experts`, no pickle), "
        "`pyvene/config.json` + `pyvene/intkey_*.bin` (pyvene's format, in its own folder so it never "
        "replaces a model's `config.json`).",
        "",
    ]
