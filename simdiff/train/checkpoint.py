"""Atomic checkpoints in safetensors + JSON (never pickle), latest-complete lookup, inference export.

Layout: ``run_dir/checkpoints/step_000123/`` holding

* ``model.safetensors``      model state dict (the unwrapped module);
* ``ema.safetensors``        EMA shadow (float32), absent when the EMA is disabled;
* ``optimizer.safetensors``  the optimizer's tensors, flattened as ``state.<param index>.<key>``;
* ``rng.safetensors``        torch CPU / CUDA RNG states as uint8 tensors;
* ``state.json``             written last: step, images seen, configs, optimizer structure and scalars,
                             python/numpy RNG states, data-iterator state, non-finite counts, library version,
                             the byte size and SHA-256 of every other file (``files`` / ``sha256``) and the
                             SHA-256 of its own canonical JSON (``state_sha256``).

Writing: everything goes into ``checkpoints/.tmp-step_000123-<pid>/``, each file is fsynced, then the
directory is renamed into place with ``os.replace`` (atomic on POSIX) and the parent fsynced. A killed
writer leaves only a ``.tmp-*`` directory, which :func:`load_latest` ignores and which the next owner of the run
directory removes (:mod:`simdiff.train.rundir`; a save removes only its own temp folders). A failed write (disk
full, read-only) removes its temp folder and raises a one-line :class:`~simdiff.train.errors.RunDirError`; the
checkpoints already written are untouched.

Reading verifies sizes, hashes (when present: checkpoints written before hashes existed still load) and that every
floating-point tensor is finite. Any damaged checkpoint raises :class:`CheckpointError` with a one-line
``<path>: <reason>`` message; :func:`load_latest` with ``fallback=True`` prints one warning line per damaged
checkpoint and uses the next older one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from simdiff.train import rundir
from simdiff.train.errors import CheckpointError, RunDirError, RunLockedError

__all__ = [
    "CheckpointError", "RunDirError", "RunLockedError", "Checkpoint", "save_checkpoint", "load_checkpoint",
    "load_latest", "list_checkpoints", "flatten_optimizer_state", "unflatten_optimizer_state", "export_inference",
    "load_inference", "library_version", "rng_tensors", "host_rng_doc", "restore_rng",
]

FORMAT = "simdiff-checkpoint-v1"
INFERENCE_FORMAT = "simdiff-inference-v1"
TENSOR_FILES = ("model", "ema", "optimizer", "rng", "aux")
_DEVICE_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@dataclass
class Checkpoint:
    """A loaded checkpoint (all tensors on CPU)."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    #: loss-owned training state (distillation: auxiliary networks and their optimizers, round teachers, ...).
    aux: dict[str, torch.Tensor] | None = None


def library_version() -> str:
    """The installed simdiff version (``"unknown"`` when not installed)."""
    try:
        from importlib.metadata import version

        return version("simdiff")
    except Exception:  # noqa: BLE001 - any metadata failure just means unknown
        return "unknown"


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views of one buffer)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<idx>.<key>``) and JSON-safe structure."""
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        for k, v in g.items():
            if torch.is_tensor(v):  # e.g. a tensor lr
                g[k] = v.item()
    return _cpu(tensors), {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state` (tuples such as ``betas`` are restored)."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def merge_param_groups(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Keep the current optimizer's device flags (fused/foreach/...) so a CUDA checkpoint loads on CPU."""
    groups = []
    for g_saved, g_now in zip(saved["param_groups"], current["param_groups"]):
        g = dict(g_saved)
        for k in _DEVICE_FLAGS:
            if k in g_now:
                g[k] = g_now[k]
        groups.append(g)
    return {"state": saved["state"], "param_groups": groups}


def _nonfinite_key(tensors: dict[str, torch.Tensor]) -> str | None:
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return k
    return None


def _assert_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    bad = _nonfinite_key(tensors)
    if bad is not None:
        raise CheckpointError(f"{name}: tensor {bad!r} holds NaN/inf; refusing to write a non-finite checkpoint")


def _write_bytes(path: Path, data: bytes) -> None:
    rundir.write_synced(path, data)


def _fsync_dir(path: Path) -> None:
    rundir.fsync_dir(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _doc_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of ``doc`` without its ``state_sha256`` entry, as canonical JSON (sorted keys, no spaces; floats
    round-trip exactly through JSON, so a parsed document re-serialises to the same bytes)."""
    body = {k: v for k, v in doc.items() if k != "state_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories ``run_dir/checkpoints/step_*`` sorted by step (temp dirs excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
    keep_last: int | None = None,
    aux: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write checkpoint ``step``; return its directory. Non-finite tensors -> CheckpointError; an
    ``OSError`` while writing (disk full, read-only) -> one-line RunDirError, no temp folder left, older
    checkpoints untouched.

    Args:
        model / ema: state dicts; optimizer: ``optimizer.state_dict()``; rng: named uint8 RNG-state tensors;
        state: extra JSON-safe fields for ``state.json``; keep_last: delete all but the newest N checkpoints.
        aux: flat tensors of loss-owned state (written to ``aux.safetensors``; None: no file).
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    final = root / name
    tensors = {"model": _cpu(model), "ema": _cpu(ema) if ema is not None else None, "rng": _cpu(rng or {}),
               "aux": _cpu(aux) if aux is not None else None}
    opt_meta = None
    if optimizer is not None:
        tensors["optimizer"], opt_meta = flatten_optimizer_state(optimizer)
    for key in ("model", "ema", "optimizer", "aux"):
        if tensors.get(key) is not None:
            _assert_finite(str(final / f"{key}.safetensors"), tensors[key])
    tmp = rundir.temp_path(root / name)
    current = final  # the file being written, for error messages
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_own_temps(root)
        tmp.mkdir()
        sizes, hashes = {}, {}
        for key, tdict in tensors.items():
            if tdict is None:
                continue
            data = st_save(tdict, metadata={"format": FORMAT})
            current = final / f"{key}.safetensors"
            _write_bytes(tmp / f"{key}.safetensors", data)
            sizes[f"{key}.safetensors"], hashes[f"{key}.safetensors"] = len(data), _sha256(data)
        doc = {"format": FORMAT, "version": library_version(), "step": step, **(state or {})}
        doc["optimizer_meta"], doc["files"], doc["sha256"] = opt_meta, sizes, hashes
        doc["state_sha256"] = _doc_digest(doc)
        current = final / "state.json"
        _write_bytes(tmp / "state.json", json.dumps(doc, indent=1, allow_nan=False).encode())
        _fsync_dir(tmp)
        current = final
        if final.exists():  # re-saving a step: move the old one aside first (os.replace needs an empty target)
            old = rundir.temp_path(root / f"old-{name}")
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise rundir.write_error(e, run_dir=run_dir, what=f"the checkpoint of step {step}",
                                     path=current) from None
        raise
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_own_temps(root: Path) -> None:
    """Remove this process's leftover temp folders in ``root`` (another process's are never touched here)."""
    mine = f"-{os.getpid()}"
    for entry in root.iterdir():
        if entry.name.startswith(rundir.TMP_PREFIX) and entry.name.endswith(mine):
            shutil.rmtree(entry, ignore_errors=True)


def _read_tensors(path: Path, expected_size: int | None, expected_sha256: str | None = None
                  ) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if expected_size is not None and len(data) != expected_size:
        raise CheckpointError(f"{path}: truncated or altered ({len(data)} bytes, state.json says {expected_size})")
    if expected_sha256 is not None and _sha256(data) != expected_sha256:
        raise CheckpointError(f"{path}: contents altered (SHA-256 differs from the one in state.json)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
    if path.name != "rng.safetensors":
        bad = _nonfinite_key(tensors)
        if bad is not None:
            raise CheckpointError(f"{path}: tensor {bad!r} holds NaN/inf; refusing non-finite weights")
    return tensors


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate one checkpoint directory (CPU tensors); any damage -> one-line CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    sj = path / "state.json"
    if not sj.is_file():
        raise CheckpointError(f"{sj}: missing file (incomplete checkpoint)")
    try:
        doc = json.loads(sj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sj}: bad JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{sj}: cannot read ({e.strerror})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "step" not in doc or "files" not in doc:
        raise CheckpointError(f"{sj}: not a {FORMAT} state file")
    if "state_sha256" in doc and doc["state_sha256"] != _doc_digest(doc):
        raise CheckpointError(f"{sj}: contents altered (its SHA-256 differs from the one it records)")
    files, hashes = doc["files"], doc.get("sha256") or {}
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise CheckpointError(f"{sj}: lists no model.safetensors")
    loaded = {k: _read_tensors(path / f"{k}.safetensors", files[f"{k}.safetensors"], hashes.get(f"{k}.safetensors"))
              for k in TENSOR_FILES if f"{k}.safetensors" in files}
    optimizer = None
    if "optimizer" in loaded:
        if not isinstance(doc.get("optimizer_meta"), dict):
            raise CheckpointError(f"{sj}: optimizer.safetensors present but optimizer_meta missing")
        optimizer = unflatten_optimizer_state(loaded["optimizer"], doc["optimizer_meta"])
    return Checkpoint(path=path, step=int(doc["step"]), model=loaded["model"], ema=loaded.get("ema"),
                      optimizer=optimizer, rng=loaded.get("rng", {}), state=doc,
                      aux=loaded.get("aux"))


def load_latest(run_dir: str | Path, *, fallback: bool = False) -> Checkpoint | None:
    """The newest checkpoint in ``run_dir`` (None if there is none).

    Temp directories of interrupted writes are never considered. If the newest checkpoint is damaged this
    raises :class:`CheckpointError`, unless ``fallback=True``: then it tries the older ones and, when one loads,
    prints one warning line per skipped checkpoint to stderr (``simdiff: warning: skipping damaged checkpoint
    <path> (<reason>); using step_...``); when none loads it raises one line naming the first problem.
    """
    candidates = list_checkpoints(run_dir)
    errors = []
    for path in reversed(candidates):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            if not fallback:
                raise
            errors.append((path, str(e)))
            continue
        for bad, reason in errors:  # warned only when an older checkpoint is used (else the error says it all)
            print(f"simdiff: warning: skipping damaged checkpoint {bad} ({reason.removeprefix(f'{bad}/')}); using "
                  f"{path.name}", file=sys.stderr, flush=True)
        return ckpt
    if errors:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no loadable checkpoint ({errors[0][1]})")
    return None


def export_inference(src: str | Path, out_path: str | Path, *, dtype: torch.dtype | None = None,
                     sample: dict | None = None) -> Path:
    """Write the EMA weights (model weights if no EMA) of a run dir's latest checkpoint, or of one checkpoint
    directory, to one ``.safetensors`` file; the config JSON goes in its metadata under ``"config"``.

    ``dtype`` (e.g. ``torch.float16``) casts floating-point weights for a smaller file; loading casts them back
    to the model's dtype. ``sample`` replaces fields of the recorded sampling defaults (``{"grid": "calibrated",
    "guidance": 2.0}``: what ``simdiff sample FILE`` does without flags); each is checked like a ``sample.*``
    setting (one-line ConfigError)."""
    src = Path(src)
    if src.is_file():
        raise CheckpointError(f"{src}: a file, not a run or checkpoint directory (export reads a training run; an "
                              "exported .safetensors file is already in the export format)")
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such run or checkpoint directory")
    ckpt = load_checkpoint(src) if (src / "state.json").exists() else load_latest(src, fallback=True)
    if ckpt is None:
        raise CheckpointError(f"{src}: no checkpoint to export (no {src / 'checkpoints' / 'step_*'} directory)")
    weights = ckpt.ema if ckpt.ema is not None else ckpt.model
    config = dict(ckpt.state.get("config") or {})
    if sample:
        config = _with_sample_defaults(config, sample)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    meta = {
        "format": INFERENCE_FORMAT,
        "config": json.dumps(config),
        "step": str(ckpt.step),
        "weights": "ema" if ckpt.ema is not None else "model",
        "version": library_version(),
    }
    out = Path(out_path)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give the output file's path, e.g. {out / 'model.safetensors'}")
    data = st_save({**_cpu(weights), **_run_moments(src, dtype or torch.float32)}, metadata=meta)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_bytes(out, data)  # no temp file is left behind when it fails
    except OSError as e:
        reason = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise CheckpointError(f"{out}: cannot write the export ({reason}); choose another output path") from None
    return out


def _run_moments(src: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The data moments a run directory keeps (``data_moments.safetensors``), keyed for embedding in an export and
    cast to the export's ``dtype``."""
    from simdiff.samplers.gaussian import MOMENTS_FILE, MOMENTS_PREFIX, DataMoments

    run = src.parent.parent if (src / "state.json").exists() else src  # a checkpoint directory: run/checkpoints/step
    try:
        moments = DataMoments.load(run / MOMENTS_FILE)
    except (ValueError, CheckpointError) as e:
        raise CheckpointError(f"{run / MOMENTS_FILE}: damaged data moments ({e}); delete the file to export "
                              "without them") from None
    return {} if moments is None else moments.tensors(MOMENTS_PREFIX, dtype)


def _with_sample_defaults(config: dict, sample: dict) -> dict:
    """``config`` (a checkpoint's config dict) with ``experiment.sample`` fields replaced by ``sample``."""
    from simdiff.configuration import ConfigError
    from simdiff.generate import SampleConfig, sample_field_problem

    fields = set(SampleConfig.__dataclass_fields__)
    for key, value in sample.items():
        if key not in fields:
            raise ConfigError(f"sample.{key}: unknown sampling setting; valid: {', '.join(sorted(fields))}")
        problem = sample_field_problem(key, value)
        if problem:
            raise ConfigError(f"sample.{key} {problem}")
    experiment = dict(config.get("experiment") or {})
    experiment["sample"] = {**(experiment.get("sample") or {}), **sample}
    return {**config, "experiment": experiment}


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (never unpickled); missing or damaged -> one-line
    CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
    return state, meta


def load_inference(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an :func:`export_inference` file -> ``(state_dict, config_dict)``; damage -> CheckpointError."""
    path = Path(path)
    state, meta = read_safetensors(path)
    if meta.get("format") != INFERENCE_FORMAT:
        raise CheckpointError(f"{path}: not a {INFERENCE_FORMAT} file (metadata format={meta.get('format')!r})")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: bad config JSON in metadata ({e})") from None
    return state, config


# ----------------------------------------------------------------------------------------------- RNG states
def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch CPU (and initialised CUDA) RNG states as uint8 tensors (for ``rng.safetensors``)."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def host_rng_doc() -> dict[str, list[Any]]:
    """The python and numpy global RNG states as JSON-safe lists (for ``state.json``)."""
    return {"python": _py_rng_state(), "numpy": _np_rng_state()}


def _py_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _np_rng_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def restore_rng(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Restore the RNG states written by :func:`rng_tensors` and :func:`host_rng_doc`."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = doc["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
