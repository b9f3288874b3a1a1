"""DeepSpeed checkpoints that can be trusted on --resume, and the consolidated ctxmem checkpoint.

    OUT/checkpoints/step_0000100/       DeepSpeed's files (model states, one optimizer partition per rank)
    OUT/checkpoints/step_0000100/ctxmem_state.json   written last: step, world size, stage, the
                                        model config and the size + sha256 of every file above
    OUT/checkpoints/latest              the newest complete tag (DeepSpeed's format: the tag name)

A checkpoint without ctxmem_state.json was interrupted while saving; one whose files do not match
their hashes, or that holds files the manifest does not list, is corrupt or tampered with. All are
refused, naming the file and an alternative, before anything is unpickled: DeepSpeed's loader and
`ds_to_universal` call torch.load(weights_only=False), so a checkpoint file can run code. The
manifest detects corruption and swapped files; it is not a signature (whoever can rewrite the
folder can rewrite the manifest), so resume only from storage that only you can write.

Another number of ranks: stage 0 checkpoints hold the whole model and optimizer and load as they
are; ZeRO-1/2/3 partitions are per rank, so `to_universal` runs DeepSpeed's `ds_to_universal` on
the verified checkpoint (whole fp32 weights and Adam moments per parameter) into
OUT/checkpoints/universal/TAG, which every rank loads with `checkpoint.load_universal` and cuts to
its own partition; the copy is removed once loaded.

Consolidation to fp32 weights (for `ctxmem.checkpoint.save_checkpoint`):
    stage 0     every rank holds the full fp32 model; rank 0 copies it
    stages 1-3  DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges the fp32 master
                partitions of the checkpoint just written (it does not handle stage-0 checkpoints)
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ResumeError

STATE = "ctxmem_state.json"
LATEST = "latest"
UNIVERSAL = "universal"  # OUT/checkpoints/universal/TAG: a resharding copy, removed once loaded
CHECKPOINTS = "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_manifest(root: Path, tag: str, state: dict[str, Any]) -> None:
    """Rank 0, after every rank has written its files: hash them, then mark the tag complete."""
    folder = root / tag
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE}
    _write_atomic(folder / STATE, json.dumps({**state, "tag": tag, "files": files}, indent=2) + "\n")
    _write_atomic(root / LATEST, tag)


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (and any incomplete older ones)."""
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    complete = [t for t in tags if (root / t / STATE).exists()]
    keep_set = set(complete[-keep:])
    newest = complete[-1] if complete else None
    removed = []
    for t in tags:
        if t not in keep_set and (newest is None or t < newest):
            shutil.rmtree(root / t, ignore_errors=True)
            removed.append(t)
    return removed


@dataclass(frozen=True)
class ResumePoint:
    root: Path  # the folder DeepSpeed loads from (holds the tag folders)
    tag: str
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def folder(self) -> Path:
        return self.root / self.tag


def existing_checkpoints(out: Path) -> list[str]:
    root = out / CHECKPOINTS
    return sorted(p.name for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def locate(resume: str, out: Path) -> tuple[Path, str]:
    """--resume (\"auto\" or a path) -> (root, tag). Accepts a tag folder, a checkpoints folder or a run folder."""
    if resume == "auto":
        root = out / CHECKPOINTS
        if not root.is_dir() or not existing_checkpoints(out):
            raise ResumeError(f"--resume: {out} holds no checkpoints to resume from ({root} is empty or missing); "
                              "start without --resume, or pass --resume PATH")
    else:
        path = Path(resume)
        if not path.exists():
            raise ResumeError(f"--resume {resume}: no such file or folder")
        if (path / STATE).exists() or path.name.startswith("step_"):
            return path.parent, path.name
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    latest = root / LATEST
    if latest.exists():
        tag = latest.read_text().strip()
        if not tag or Path(tag).name != tag or tag in (".", ".."):
            raise ResumeError(f"--resume: {latest} names {tag!r}, not a checkpoint folder beside it; "
                              "pass the checkpoint folder itself (--resume PATH/step_NNNNNNN)")
    else:
        tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
        if not tags:
            raise ResumeError(f"--resume: {root} holds no step_* checkpoint folders")
        tag = tags[-1]
    return root, tag


def verify(root: Path, tag: str, check_hashes: bool = True) -> ResumePoint:
    """The checkpoint's manifest, after checking every file it lists. Raises ResumeError."""
    folder = root / tag
    earlier = [t for t in sorted(p.name for p in root.glob("step_*") if (p / STATE).exists()) if t < tag]
    alternative = (f"; the newest earlier complete checkpoint is {root / earlier[-1]} (--resume {root / earlier[-1]})"
                   if earlier else "")
    if not folder.is_dir():
        raise ResumeError(f"--resume: checkpoint folder {folder} does not exist{alternative}")
    manifest = folder / STATE
    if not manifest.exists():
        raise ResumeError(f"--resume: {folder} is incomplete (no {STATE}: the run stopped while saving it, "
                          f"or it was not written by ctxmem){alternative}")
    try:
        state = json.loads(manifest.read_text())
        files = state["files"]
        int(state["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ResumeError(f"--resume: {manifest} is corrupt ({err}){alternative}") from None
    # DeepSpeed and ds_to_universal find shards by glob (*_optim_states.pt): a file the manifest does
    # not list would be unpickled unchecked, so the folder must hold exactly the listed files.
    unlisted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and p.name != STATE and str(p.relative_to(folder)) not in files)
    if unlisted:
        raise ResumeError(f"--resume: {folder / unlisted[0]} is not in the checkpoint's manifest {manifest} "
                          f"({len(unlisted)} unlisted file(s)); it was not written by this run's save - remove it "
                          f"if you trust the rest, or resume from another checkpoint{alternative}")
    for name, info in files.items():
        path = folder / name
        if not path.exists():
            raise ResumeError(f"--resume: {path} is missing from the checkpoint{alternative}")
        if path.stat().st_size != info["bytes"]:
            raise ResumeError(f"--resume: {path} is corrupt (size {path.stat().st_size} bytes, the manifest says "
                              f"{info['bytes']}){alternative}")
        if check_hashes and _sha256(path) != info["sha256"]:
            raise ResumeError(f"--resume: {path} is corrupt (its sha256 differs from the manifest {manifest}) "
                              f"and was not loaded (DeepSpeed's loader unpickles, which can run code); restore "
                              f"it from a copy you trust{alternative or ', or start over with --overwrite'}")
    return ResumePoint(root, tag, state)


def check_compatible(point: ResumePoint, *, zero_stage: int, model_config: dict[str, Any],
                     global_batch: int, seq_len: int, seed: int) -> None:
    """Refuse a resume that could not continue the same run. Another world size is allowed: stage 0
    checkpoints are whole on every rank, and stages 1-3 are resharded (`to_universal`)."""
    s = point.state
    problems = []
    if s.get("zero_stage") != zero_stage:
        problems.append(f"it is a ZeRO stage-{s.get('zero_stage')} checkpoint, the config says stage {zero_stage}")
    if s.get("model_config") != model_config:
        changed = sorted(k for k in set(model_config) | set(s.get("model_config") or {})
                         if (s.get("model_config") or {}).get(k) != model_config.get(k))
        problems.append(f"the model differs in {changed}")
    for key, value in (("global_batch", global_batch), ("seq_len", seq_len), ("seed", seed)):
        if s.get(key) != value:
            problems.append(f"{key} was {s.get(key)}, the config says {value} (the data order would change)")
    if problems:
        raise ResumeError(f"--resume {point.folder} cannot continue this run: " + "; ".join(problems))


def to_universal(point: ResumePoint, dest: Path) -> ResumePoint:
    """DeepSpeed's `ds_to_universal` on a verified ZeRO-1/2/3 checkpoint: every parameter's fp32
    master weight and Adam moments, whole (dest/TAG/zero/NAME/{fp32,exp_avg,exp_avg_sq}.pt), plus
    the model-states files (lr scheduler, client state). An engine built with
    `checkpoint.load_universal` loads it on any number of ranks and cuts its own partitions.
    It unpickles the shards (torch.load(weights_only=False)): call it only after `verify`."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    folder = dest / point.tag
    if dest.exists():
        shutil.rmtree(dest)  # a conversion left by an interrupted resume
    dest.mkdir(parents=True)
    # one worker each: no process pool, since forking a rank that holds a process group and native
    # thread pools is unsafe (the conversion is file copies; one process does it in seconds here)
    args = argparse.Namespace(input_folder=str(point.folder), output_folder=str(folder), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our saves carry no Megatron metadata
    quiet = io.StringIO()  # it prints every step and draws progress bars
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal(args)
    except Exception as err:  # noqa: BLE001 - one message naming the checkpoint
        raise ResumeError(f"--resume {point.folder}: DeepSpeed's ds_to_universal could not reshard it "
                          f"({type(err).__name__}: {err}); resume with the --nproc it was written with "
                          f"({point.state.get('world_size')})") from None
    return ResumePoint(dest, point.tag, point.state)


def consolidated_state_dict(engine, root: Path, tag: str, stage: int, rank: int):
    """fp32 weights of the whole model on rank 0 (None elsewhere); collective-free for stages 1-3."""
    import torch

    if rank != 0:
        return None
    if stage == 0:
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()  # it prints, and draws progress bars, for every shard it reads
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {k: v.to(torch.float32) for k, v in sd.items()}


def live_weights(engine, stage: int, rank: int):
    """The engine's current weights on rank 0 (ZeRO-3: gathered from every rank - a collective)."""
    import torch

    params = list(engine.module.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return ({n: p.detach().to("cpu", torch.float32).clone() for n, p in engine.module.named_parameters()}
                    if rank == 0 else None)
    return ({n: p.detach().to("cpu", torch.float32).clone() for n, p in engine.module.named_parameters()}
            if rank == 0 else None)
