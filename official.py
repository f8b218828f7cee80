"""Interop with the released LeWM checkpoints: load them into model.py's `LeWM`, export ours in their format, and
load a model by name (our checkpoint, a folder of released files, or a Hugging Face hub repository).

Serves evaluate.py (`--official`), the README's `load_pretrained` and anyone sharing a trained model. The released
format (docs/method.md §2) is a `weights.pt` state dict under the official module names (the encoder under
transformers 4.x or 5.x ViT names, q/k/v as three Linears where model.py fuses them) and a `config.json` with one
section per module. Nothing here is part of the method; model.py runs without this file. An export appears whole or
not at all (a temporary folder beside it, then a rename), and never lands in a training run's folder.

Run:
    python official.py export --ckpt runs/pusht_cpu/ckpt.pt --out export/   # also: python model.py export ...
"""

import argparse
import json
import math
import os
import re
import shutil

import torch

import cli
from cli import UsageError
from model import LeWM, ModelConfig, check_state_dict, load_checkpoint, model_from_checkpoint, save_checkpoint

# --- the released checkpoints (weights.pt + config.json, docs/method.md §2)

# (official key pattern, our key pattern); `{i}` is a layer index. Encoder keys use transformers 4.x ViT names;
# q/k/v are three Linears there and one fused Linear here.
_KEY_MAP = [
    ("encoder.embeddings.cls_token", "encoder.cls_token"),
    ("encoder.embeddings.position_embeddings", "encoder.pos_embed"),
    ("encoder.embeddings.patch_embeddings.projection.{p}", "encoder.patch_embed.{p}"),
    ("encoder.encoder.layer.{i}.layernorm_before.{p}", "encoder.blocks.{i}.norm1.{p}"),
    ("encoder.encoder.layer.{i}.attention.output.dense.{p}", "encoder.blocks.{i}.proj.{p}"),
    ("encoder.encoder.layer.{i}.layernorm_after.{p}", "encoder.blocks.{i}.norm2.{p}"),
    ("encoder.encoder.layer.{i}.intermediate.dense.{p}", "encoder.blocks.{i}.fc1.{p}"),
    ("encoder.encoder.layer.{i}.output.dense.{p}", "encoder.blocks.{i}.fc2.{p}"),
    ("encoder.layernorm.{p}", "encoder.norm.{p}"),
    ("predictor.pos_embedding", "predictor.pos_embed"),
    ("predictor.transformer.layers.{i}.attn.norm.{p}", "predictor.blocks.{i}.attn.norm.{p}"),
    ("predictor.transformer.layers.{i}.attn.to_qkv.{p}", "predictor.blocks.{i}.attn.qkv.{p}"),
    ("predictor.transformer.layers.{i}.attn.to_out.0.{p}", "predictor.blocks.{i}.attn.proj.{p}"),
    ("predictor.transformer.layers.{i}.mlp.net.0.{p}", "predictor.blocks.{i}.mlp.norm.{p}"),
    ("predictor.transformer.layers.{i}.mlp.net.1.{p}", "predictor.blocks.{i}.mlp.fc1.{p}"),
    ("predictor.transformer.layers.{i}.mlp.net.4.{p}", "predictor.blocks.{i}.mlp.fc2.{p}"),
    ("predictor.transformer.layers.{i}.adaLN_modulation.1.{p}", "predictor.blocks.{i}.adaln.{p}"),
    ("predictor.transformer.norm.{p}", "predictor.norm.{p}"),
    ("action_encoder.patch_embed.{p}", "action_encoder.conv.{p}"),
    ("action_encoder.embed.0.{p}", "action_encoder.fc1.{p}"),
    ("action_encoder.embed.2.{p}", "action_encoder.fc2.{p}"),
    ("projector.net.{p}", "projector.net.{p}"),
    ("pred_proj.net.{p}", "pred_proj.net.{p}"),
]
_QKV_4X = "encoder.encoder.layer.{i}.attention.attention.{name}.{p}"
# transformers 5.x renames inside the encoder layers (docs/method.md §2); everything else is unchanged.
_HF5_TO_HF4 = [
    (r"^encoder\.layers\.(\d+)\.", r"encoder.encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def _pattern(template: str) -> re.Pattern:
    esc = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[\w.]+)")
    return re.compile(f"^{esc}$")


def _rename(key: str, to_ours: bool) -> str | None:
    """Map one key through _KEY_MAP (official -> ours, or back); None when no pattern matches."""
    for theirs, ours in _KEY_MAP:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        m = _pattern(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


def official_to_ours(state: dict) -> dict:
    """Rename an official state dict (transformers 4.x or 5.x encoder names) to this module's names."""
    state = dict(state)
    if any(k.startswith("encoder.layers.") for k in state):
        for pat, rep in _HF5_TO_HF4:
            state = {re.sub(pat, rep, k) if k.startswith("encoder.") else k: v for k, v in state.items()}
    out, qkv = {}, {}
    qkv_pat = _pattern(_QKV_4X.replace("{name}", "QKVNAME")).pattern.replace("QKVNAME", r"(?P<name>query|key|value)")
    for key, value in state.items():
        m = re.match(qkv_pat, key)
        if m:
            qkv.setdefault((m["i"], m["p"]), {})[m["name"]] = value
            continue
        out[_rename(key, to_ours=True) or key] = value  # unmapped keys: check_state_dict reports them
    for (i, p), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"encoder layer {i} {p}: need query, key and value, found {sorted(parts)}")
        out[f"encoder.blocks.{i}.qkv.{p}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def ours_to_official(state: dict) -> dict:
    """Inverse of official_to_ours, producing transformers 4.x encoder names (the released format)."""
    out = {}
    for key, value in state.items():
        m = _pattern("encoder.blocks.{i}.qkv.{p}").match(key)
        if m:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[_QKV_4X.format(i=m["i"], name=name, p=m["p"])] = part.clone()
            continue
        name = _rename(key, to_ours=False)
        if name is None:
            raise KeyError(f"no official name for {key}")
        out[name] = value
    return out


def config_from_official(state: dict, config: dict) -> ModelConfig:
    """Architecture from the official state dict's shapes; head counts and dropout from config.json."""
    enc, pred = config.get("encoder", {}), config.get("predictor", {})
    heads_by_size = {"tiny": 3, "small": 6, "base": 12, "large": 16}
    patch = state["encoder.patch_embed.weight"].shape[-1]
    tokens = state["encoder.pos_embed"].shape[1] - 1
    enc_heads = enc.get("num_attention_heads", heads_by_size.get(enc.get("size", "tiny"), 3))
    pred_heads = pred.get("heads", 16)
    inner = state["predictor.blocks.0.attn.qkv.weight"].shape[0] // 3

    def count(prefix: str) -> int:
        return len({k.split(".")[2] for k in state if k.startswith(prefix)})

    return ModelConfig(
        img_size=int(enc.get("image_size", round(math.sqrt(tokens)) * patch)),
        patch_size=patch,
        embed_dim=state["encoder.cls_token"].shape[-1],
        enc_depth=count("encoder.blocks."),
        enc_heads=enc_heads,
        enc_mlp=state["encoder.blocks.0.fc1.weight"].shape[0],
        pred_depth=count("predictor.blocks."),
        pred_heads=pred_heads,
        pred_dim_head=pred.get("dim_head", inner // pred_heads),
        pred_mlp=state["predictor.blocks.0.mlp.fc1.weight"].shape[0],
        pred_dropout=float(pred.get("dropout", 0.1)),
        proj_hidden=state["projector.net.0.weight"].shape[0],
        action_dim=state["action_encoder.conv.weight"].shape[1],
        action_smoothed_dim=state["action_encoder.conv.weight"].shape[0],
        action_mlp_scale=state["action_encoder.fc1.weight"].shape[0] // state["encoder.cls_token"].shape[-1],
        history=state["predictor.pos_embed"].shape[1],
    )


def load_official(weights_path: str, config_path: str) -> LeWM:
    """Load a released LeWM checkpoint (weights.pt state dict + config.json) into this module, in eval mode."""
    for p in (weights_path, config_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"official checkpoint file not found: {p}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not a JSON config file ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an official LeWM config object")
    missing_sections = [
        s for s in ("encoder", "predictor", "action_encoder", "projector", "pred_proj") if s not in config
    ]
    if missing_sections:
        raise ValueError(f"{config_path} lacks the sections {missing_sections} of an official LeWM config.json")
    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files end here; never torch's advice to turn weights_only off
        first_line = str(e).split("\n")[0]
        why = "holds Python objects" if "weights_only" in str(e) else f"{type(e).__name__}: {first_line}"
        raise ValueError(f"{weights_path} is not a readable weights file ({why})") from e
    if isinstance(raw, dict) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ValueError(f"{weights_path} holds a {type(raw).__name__}, not a state dict of named tensors")
    state = {k.removeprefix("model."): v for k, v in raw.items()}
    state = official_to_ours(state)
    needed = [
        "encoder.patch_embed.weight",
        "encoder.pos_embed",
        "encoder.cls_token",
        "encoder.blocks.0.fc1.weight",
        "predictor.blocks.0.attn.qkv.weight",
        "predictor.blocks.0.mlp.fc1.weight",
        "predictor.pos_embed",
        "projector.net.0.weight",
        "action_encoder.conv.weight",
        "action_encoder.fc1.weight",
    ]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(f"{weights_path} is not an official LeWM state dict; missing keys (our names): {absent}")
    model = LeWM(config_from_official(state, config))
    check_state_dict(model, state, weights_path)
    model.load_state_dict(state)
    return model.eval()


# --- export for sharing


def _hf4_to_hf5(key: str) -> str:
    """One transformers 4.x encoder key under its 5.x name (the inverse of _HF5_TO_HF4)."""
    m = re.match(r"^encoder\.encoder\.layer\.(\d+)\.(.+)$", key)
    if not m:
        return key
    tail = m[2]
    for old, new in [
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ]:
        tail = tail.replace(old, new)  # attention.output.dense before output.dense
    return f"encoder.layers.{m[1]}.{tail}"


def export_official(model: LeWM, folder: str, hf5: bool = False) -> tuple[str, str]:
    """Write `model` in the released format: folder/weights.pt (official key names) and folder/config.json.

    Keys use transformers 4.x ViT names, as the released files do (hf5=True writes 5.x names instead). config.json
    follows the released layout: one section per module with its `_target_` and constructor arguments.
    """
    state = ours_to_official(model.state_dict())
    if hf5:
        state = {_hf4_to_hf5(k): v for k, v in state.items()}
    c = model.cfg
    mlp = {
        "_target_": "stable_worldmodel.wm.lewm.module.MLP",
        "input_dim": c.embed_dim,
        "output_dim": c.embed_dim,
        "hidden_dim": c.proj_hidden,
        "norm_fn": {"_target_": "torch.nn.BatchNorm1d", "_partial_": True},
    }
    config = {
        "_target_": "stable_worldmodel.wm.lewm.LeWM",
        "encoder": {
            "_target_": "stable_pretraining.backbone.utils.vit_hf",
            # The official vit_hf knows only named sizes; it applies the explicit fields below on top of the named
            # one, so "tiny" plus those fields builds any of our encoders (another name would be a KeyError there).
            "size": "tiny",
            "patch_size": c.patch_size,
            "image_size": c.img_size,
            "pretrained": False,
            "use_mask_token": False,
            # DEVIATION: explicit ViT sizes beside `size` (the release names only "tiny"; smaller presets need them).
            "hidden_size": c.embed_dim,
            "num_hidden_layers": c.enc_depth,
            "num_attention_heads": c.enc_heads,
            "intermediate_size": c.enc_mlp,
        },
        "predictor": {
            "_target_": "stable_worldmodel.wm.lewm.module.Predictor",
            "num_frames": c.history,
            "input_dim": c.embed_dim,
            "hidden_dim": c.embed_dim,
            "output_dim": c.embed_dim,
            "depth": c.pred_depth,
            "heads": c.pred_heads,
            "mlp_dim": c.pred_mlp,
            "dim_head": c.pred_dim_head,
            "dropout": c.pred_dropout,
            "emb_dropout": 0.0,
        },
        "action_encoder": {
            "_target_": "stable_worldmodel.wm.lewm.module.Embedder",
            "input_dim": c.action_dim,
            "emb_dim": c.embed_dim,
        },
        "projector": dict(mlp),
        "pred_proj": dict(mlp),
    }
    os.makedirs(folder, exist_ok=True)
    weights, config_path = os.path.join(folder, "weights.pt"), os.path.join(folder, "config.json")
    save_checkpoint(weights, state)
    tmp = f"{config_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, config_path)
    return weights, config_path


# Everything a checkpoint of ours needs for evaluation and planning; optimizer, scaler and RNG state are left out.
SHARED_KEYS = ("model", "model_config", "action_stats", "env", "step", "train_config", "val_episodes")


def export_weights_only(ckpt: dict, path: str) -> str:
    """Write a copy of a training checkpoint without optimizer or RNG state (loads with weights_only=True)."""
    save_checkpoint(path, {k: ckpt[k] for k in SHARED_KEYS if k in ckpt})
    return path


EXPORT_FILES = ("weights.pt", "config.json", "model.pt")  # what an export folder holds


def check_export_folder(out: str, ckpt_path: str) -> None:
    """--out is a new folder or an earlier export (which is replaced): never a file, the checkpoint's own folder,
    a training run's folder (its config.json is the run's record) or a folder holding anything else."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: is a file, expected a folder")
    if os.path.realpath(out) == os.path.realpath(os.path.dirname(os.path.abspath(ckpt_path))):
        raise UsageError(f"--out {out}: is the folder of --ckpt {ckpt_path}; export into a folder of its own")
    found = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if {"ckpt.pt", "metrics.jsonl", ".lock", "summary.json"} & set(found):
        raise UsageError(f"--out {out}: holds a training run; export into a folder of its own")
    if set(found) - set(EXPORT_FILES):
        raise UsageError(f"--out {out}: holds other files than an export ({', '.join(found[:4])}); choose another")
    cli.check_writable_file(os.path.join(os.path.dirname(os.path.abspath(out)), "export.tmp"), "--out")


def clean_export_leftovers(out: str) -> None:
    """Remove what an export killed midway (kill -9) left beside `out`: its temporary folder, and its renamed-away
    earlier export, put back when the new one never arrived. Only those of processes that are gone."""
    parent, name = os.path.split(os.path.abspath(out))
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = re.fullmatch(re.escape(name) + r"\.(tmp|old)(\d+)", entry)
        if not m or (int(m[2]) != os.getpid() and cli.pid_alive(int(m[2]))):
            continue
        if m[1] == "old" and not os.path.exists(out):
            os.rename(os.path.join(parent, entry), out)
            print(f"{out}: put back the earlier export, left as {entry} by an interrupted export")
        else:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            print(f"{out}: removed {entry}, left by an interrupted export")


def replace_folder(tmp: str, out: str) -> None:
    """Put the complete folder `tmp` at `out`: an earlier `out` is renamed away first, then removed."""
    old = f"{out}.old{os.getpid()}"
    if os.path.exists(out):
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if os.path.exists(old):
            os.rename(old, out)  # the earlier export back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(ckpt_path: str, out: str) -> dict[str, str]:
    """Our training checkpoint -> out/weights.pt + out/config.json (released format) and out/model.pt (ours). The
    folder appears whole or not at all: written beside it under a temporary name, then renamed into place."""
    out = os.path.normpath(out)
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, source=ckpt_path)
    clean_export_leftovers(out)
    check_export_folder(out, ckpt_path)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        weights, config = export_official(model, tmp)
        reloaded = load_official(weights, config)
        for name, a in reloaded.state_dict().items():  # the export must load back bit for bit
            if not torch.equal(a, model.state_dict()[name]):
                raise RuntimeError(f"exported {name} does not load back identically")
        export_weights_only(ckpt, os.path.join(tmp, "model.pt"))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {kind: os.path.join(out, name) for kind, name in zip(("weights", "config", "model"), EXPORT_FILES)}


# --- loading by name: a checkpoint of ours, a released folder, or a Hugging Face hub repository


def _hub_folder(repo_id: str) -> str:
    """Download (or find in the local cache) weights.pt and config.json of a hub repository; returns the folder."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(f"loading {repo_id!r} from the hub needs huggingface_hub: pip install huggingface_hub")
    try:
        paths = [hf_hub_download(repo_id, name) for name in ("config.json", "weights.pt")]
    except Exception as e:  # offline with nothing cached, unknown repository, no network
        reason = " ".join(str(e).split())  # hub errors can span several lines
        raise RuntimeError(
            f"cannot get {repo_id!r} from the hub or its local cache ({type(e).__name__}: {reason})"
        ) from e
    return os.path.dirname(paths[1])


def load_pretrained(name: str) -> LeWM:
    """A model in eval mode from a checkpoint of ours (.pt), a folder with weights.pt + config.json, or a hub
    repository "owner/name" (optionally "hf:owner/name"), downloaded once into the Hugging Face cache."""
    if os.path.isfile(name):
        return model_from_checkpoint(load_checkpoint(name), source=name)
    if os.path.isdir(name):
        return load_official(os.path.join(name, "weights.pt"), os.path.join(name, "config.json"))
    repo_id = name.removeprefix("hf:")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise FileNotFoundError(f"{name!r} is neither a file, a folder nor a hub repository name owner/name")
    folder = _hub_folder(repo_id)
    return load_official(os.path.join(folder, "weights.pt"), os.path.join(folder, "config.json"))


# --- a model named on the command line (evaluate.py --official)


def check_official(official: tuple) -> None:
    """--official is WEIGHTS CONFIG (two files), a folder holding weights.pt and config.json, or hf:owner/name."""
    if len(official) == 2:
        for path in official:
            if not os.path.isfile(path):
                raise UsageError(f"--official {path}: no such file")
    elif len(official) == 1 and os.path.isdir(official[0]):
        missing = [n for n in ("weights.pt", "config.json") if not os.path.isfile(os.path.join(official[0], n))]
        if missing:
            raise UsageError(f"--official {official[0]}: the folder lacks {' and '.join(missing)}")
    elif len(official) != 1 or not official[0].startswith("hf:"):
        raise UsageError(
            f"--official {' '.join(official)}: give hf:owner/name, a folder with weights.pt and "
            "config.json, or the two files WEIGHTS CONFIG"
        )


def load_released(official: tuple) -> LeWM:
    """The model named by --official; a missing huggingface_hub, no network or a bad file is one UsageError line."""
    check_official(official)
    try:
        return load_official(*official) if len(official) == 2 else load_pretrained(official[0])
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines()]  # a key mismatch lists its keys on several lines
        raise UsageError(f"--official {' '.join(official)}: " + "; ".join(lines)) from e


# --- command line


def main(argv: list[str] | None = None) -> None:
    """`export --ckpt CKPT --out FOLDER`: write the three files and print their sizes."""
    parser = argparse.ArgumentParser(description="Export a trained LeWM checkpoint for sharing.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write weights.pt + config.json (released format) and model.pt (weights only)")
    p.add_argument("--ckpt", required=True, help="training checkpoint written by train.py")
    p.add_argument("--out", required=True, help="folder to write the three files into")
    args = parser.parse_args(argv)
    with cli.exit_codes("model.py export"):  # a wrong file or folder: one line, exit code 2
        try:
            files = export(args.ckpt, args.out)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise UsageError("; ".join(str(e).split("\n"))) from e
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write the export ({e.strerror}); nothing was changed") from e
    for kind, path in files.items():
        print(f"{kind:8s} {path} ({os.path.getsize(path) / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
