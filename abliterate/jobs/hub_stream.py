"""`abliterate MODEL --push --stream`: edit a Hub model shard by shard on little disk, resumably.

For each input shard: download it, edit it (the same plan and streaming editor as `apply`, run on
a view of the checkpoint holding just that shard), upload the edited shard as LFS content without
committing, delete both local copies. So the disk holds about one input and one output shard. The
repo only shows the model when every shard is uploaded: one final commit adds the shards, index,
config, tokenizer, direction, card and checksums. A state file in the work folder lists the
uploaded shards with their sha256, so a rerun after an interruption skips them.

Extraction needs the whole model, so streaming takes a direction file (--direction, or a recipe
naming one): extract it first, e.g. on a machine with the disk for it, or from a smaller revision.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from abliterate.errors import AbliterateError

STATE_NAME = "stream-state.json"


@dataclass(frozen=True)
class _Source:
    """What a streamed run reads from the Hub before any shard: pinned options, metadata files, recipe, direction."""

    options: Any  # run_options.RunOptions, its revision pinned to one commit
    meta: Path  # the model's files other than weights (config, tokenizer, index, card)
    config: dict
    recipe: Any  # options.recipe.Recipe
    direction_path: Path
    direction: Any  # io.direction_file.Direction
    index: dict  # the shard index ({} without one)
    shards: list[str]

    @property
    def weight_map(self) -> dict[str, str]:
        return self.index.get("weight_map", {})


def run_stream(options) -> str:
    """Returns the repo URL. `options` is run_options.RunOptions (push and a direction are required)."""
    from huggingface_hub import HfApi

    from abliterate.edit.plan import edit_options
    from abliterate.publish.card import sha256_file
    from abliterate.publish.push import check_target, target_repo

    say = _say(options.quiet)
    _check_options(options)
    repo_id = target_repo(options.repo_id, options.model)
    check_target(repo_id, force=options.force)
    work, state_path, state = _open_state(options)
    source = _read_source(options, work)
    options = source.options
    key = {"revision": options.revision, "repo": repo_id, "direction": sha256_file(source.direction_path),
           "recipe": source.recipe.name, "apply": repr(edit_options(source.recipe.apply))}
    if state["shards"] and state.get("key") != key:  # resuming with other inputs would publish a mixed model
        changed = ", ".join(k for k in key if (state.get("key") or {}).get(k) != key[k])
        raise AbliterateError(f"{work} holds an interrupted streamed run made with another {changed}; rerun it "
                              f"with the same inputs, or delete {work} to start over")
    state["key"] = key

    api = HfApi()
    url = str(api.create_repo(repo_id, private=options.private, exist_ok=True))
    _upload_shards(source, api, repo_id, work, state_path, state, say)
    final = _final_folder(source, work, state)
    _commit(api, repo_id, final, state)
    shutil.rmtree(work)
    return url


def _say(quiet: bool) -> Callable[[str], None]:
    """Progress lines on stderr, or none with --quiet."""
    def say(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    return say


def _check_options(options) -> None:
    """What --stream cannot do, each refused before any download."""
    from abliterate.io import hub

    if not options.push:
        raise AbliterateError("--stream uploads as it goes: pass --push [REPO_ID] too")
    if hub.is_local(options.model):
        raise AbliterateError("--stream is for Hub models; for a local folder use `abliterate apply` (it already "
                              "streams tensor by tensor)")
    if options.adapter:
        raise AbliterateError("--stream writes weights; an --adapter is a few MB and needs no streaming")
    _check_commit_fields()


def _open_state(options) -> tuple[Path, Path, dict]:
    """The work folder, its state file and the state (a new one, or an interrupted run's of the same model)."""
    from abliterate.jobs.run_options import default_out

    work = options.out or default_out(options.model, False)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_NAME
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"model": options.model, "shards": {}}
    if state.get("model") != options.model:
        raise AbliterateError(f"{work} holds a streamed run of {state.get('model')}; choose another --out")
    return work, state_path, state


def _read_source(options, work: Path) -> _Source:
    """The model's commit, files other than weights, recipe, direction and shards; every shard is then read from
    that one commit, in this run and in a resumed one (the card's command names it too)."""
    from huggingface_hub import HfApi, hf_hub_download

    from abliterate.io import hub
    from abliterate.io.checkpoint import INDEX_NAME
    from abliterate.io.direction_file import load_direction
    from abliterate.options.recipe import load_recipe

    hub.repo_files(options.model, options.revision)  # the clear errors for unknown repos and revisions
    options = replace(options, revision=HfApi().model_info(options.model, revision=options.revision).sha)
    meta = hub.fetch(options.model, work / "meta", revision=options.revision, weights=False,
                     trust_remote_code=options.trust_remote_code)
    files = hub.repo_files(options.model, options.revision)
    config = json.loads((meta / "config.json").read_text())
    recipe = load_recipe(config.get("model_type"), options.recipe)
    direction_path = options.direction or (Path(recipe.apply.direction) if recipe.apply.direction else None)
    if direction_path is None:
        raise AbliterateError("--stream needs --direction FILE (extraction loads the whole model): run "
                              "`abliterate extract MODEL --out direction.safetensors` first")
    index = json.loads(Path(hf_hub_download(options.model, INDEX_NAME, revision=options.revision,
                                            local_dir=str(work / "meta"))).read_text()) if INDEX_NAME in files else {}
    shards = sorted(set(index.get("weight_map", {}).values())) or [f for f in files if f.endswith(".safetensors")]
    if not shards:
        raise AbliterateError(f"{options.model} has no .safetensors shards; abliterate loads safetensors only")
    direction = load_direction(direction_path, hidden_size=config.get("hidden_size") or
                               config.get("text_config", {}).get("hidden_size"))
    return _Source(options, meta, config, recipe, Path(direction_path), direction, index, shards)


def _upload_shards(source: _Source, api, repo_id: str, work: Path, state_path: Path, state: dict, say) -> None:
    """Each shard not uploaded yet: downloaded, edited, preuploaded, deleted; the state saved after each."""
    from abliterate.edit.plan import edit_options

    shards = source.shards
    for n, shard in enumerate(shards, 1):
        if shard in state["shards"]:
            say(f"[{n}/{len(shards)}] {shard}: uploaded in an earlier run, skipped")
            continue
        say(f"[{n}/{len(shards)}] {shard}: download, edit, upload")
        record = _edit_and_upload(source.options, api, repo_id, work, source.meta, shard, source.weight_map,
                                  source.direction, replace(edit_options(source.recipe.apply), partial=True))
        state["shards"][shard] = record
        _save_state(state_path, state)
        shard_uploaded(shard)


def _final_folder(source: _Source, work: Path, state: dict) -> Path:
    """Everything of the final commit but the shards: config, index, tokenizer, direction, checksums, card."""
    from abliterate.edit.weights import DIRECTION_NAME
    from abliterate.io.checkpoint import INDEX_NAME
    from abliterate.publish.card import checksums, write_checksums

    out_config = source.config
    for record in state["shards"].values():
        if record.get("config"):
            out_config = record["config"]
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(source.meta, final, ignore=shutil.ignore_patterns(".cache", "README.md", INDEX_NAME))
    (final / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    shutil.copyfile(source.direction_path, final / DIRECTION_NAME)
    if source.weight_map:
        new_map = {name: s for record in state["shards"].values() for name, s in record["tensors"].items()}
        (final / INDEX_NAME).write_text(json.dumps({"metadata": source.index.get("metadata", {}), "weight_map": dict(
            sorted(new_map.items()))}, indent=2) + "\n")
    # the shards are on the Hub only: their sums come from the state file
    sums = dict(sorted({**checksums(final), **{s: r["sha256"] for s, r in state["shards"].items()}}.items()))
    write_checksums(final, sums)
    (final / "README.md").write_text(_card(source, state, sums))
    return final


def _card(source: _Source, state: dict, sums: dict[str, str]) -> str:
    """The streamed model's card: what was removed and how, no evaluation (the whole model was never loaded)."""
    from abliterate.jobs.run_options import public_model, regenerate_command
    from abliterate.publish.card import CardInfo, DirectionSummary, EditSummary, base_license, render_card

    options, meta, apply = source.options, source.meta, source.recipe.apply
    card_text = (meta / "README.md").read_text(errors="replace") if (meta / "README.md").is_file() else None
    return render_card(CardInfo(
        base_model=options.model, adapter=False, license=base_license(card_text),
        direction=DirectionSummary.of(source.direction.metadata,
                                      public_model(source.direction.metadata.get("model") or options.model)),
        edit=EditSummary(apply.scale, apply.layers, tuple(apply.components),
                         sum(r["edited"] for r in state["shards"].values()),
                         notes=("streamed shard by shard (--stream); not evaluated: run `abliterate evaluate` on "
                                "the result",), norm_preserve=apply.norm_preserve),
        evaluation=None, regenerate=regenerate_command(options) + " --push --stream", recipe_name=source.recipe.name,
        files=sums))


def _commit(api, repo_id: str, final: Path, state: dict) -> None:
    """One commit: the final folder's files and every shard uploaded earlier (by this run or an interrupted one)."""
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(str(p.relative_to(final)), str(p)) for p in sorted(final.rglob("*"))
                  if p.is_file()]
    operations += [_uploaded_operation(shard, record) for shard, record in state["shards"].items()]
    api.create_commit(repo_id, operations, commit_message="abliterate: edited checkpoint (streamed), direction, card "
                      "and checksums")


def shard_uploaded(shard: str) -> None:
    """Called after each shard's upload is recorded (a seam for interruption tests)."""


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _edit_and_upload(options, api, repo_id: str, work: Path, meta: Path, shard: str, weight_map: dict[str, str],
                     direction, edit_opts) -> dict:
    """One shard: a view folder (config + this shard + its part of the index) -> apply -> preupload."""
    from huggingface_hub import CommitOperationAdd, hf_hub_download

    from abliterate.edit.plan import plan_edit
    from abliterate.edit.weights import apply_edit
    from abliterate.io.checkpoint import INDEX_NAME, Checkpoint

    view, edited = work / "view", work / "edited"
    for folder in (view, edited):
        shutil.rmtree(folder, ignore_errors=True)
    view.mkdir()
    downloaded = Path(hf_hub_download(options.model, shard, revision=options.revision, local_dir=str(work / "in")))
    os.replace(downloaded, view / shard)
    shutil.copyfile(meta / "config.json", view / "config.json")
    if weight_map:
        part = {name: s for name, s in weight_map.items() if s == shard}
        (view / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": part}))
    ckpt = Checkpoint.open(view)
    plan = plan_edit(ckpt, edit_opts)
    apply_edit(ckpt, plan, direction, edited, quiet=True)
    operation = CommitOperationAdd(shard, str(edited / shard))
    api.preupload_lfs_files(repo_id, [operation])
    new_config = json.loads((edited / "config.json").read_text())
    tensors = (json.loads((edited / INDEX_NAME).read_text())["weight_map"] if weight_map else {})
    record = {"sha256": operation.upload_info.sha256.hex(), "size": operation.upload_info.size,
              "sample": base64.b64encode(operation.upload_info.sample).decode(), "tensors": tensors,
              "edited": len(plan.edits), "config": new_config if new_config != ckpt.config else None}
    shutil.rmtree(view)
    shutil.rmtree(edited)
    shutil.rmtree(work / "in", ignore_errors=True)
    return record


def _check_commit_fields() -> None:
    """The final commit marks shards as uploaded through two private fields; fail before any work if gone."""
    import dataclasses

    import huggingface_hub
    from huggingface_hub import CommitOperationAdd

    if not {"_upload_mode", "_is_uploaded"} <= {f.name for f in dataclasses.fields(CommitOperationAdd)}:
        raise AbliterateError(f"--stream cannot commit shards uploaded earlier with huggingface_hub "
                              f"{huggingface_hub.__version__}; install huggingface_hub<3 or run without --stream")


def _uploaded_operation(shard: str, record: dict):
    """A commit entry for a shard uploaded earlier (maybe by an interrupted run) and deleted locally.

    The commit payload of an LFS file is its path, sha256 and size; huggingface_hub builds it from
    `upload_info` and skips the upload of an operation marked uploaded, which is what
    `preupload_lfs_files` itself does.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(shard, b"")
    op.upload_info = UploadInfo(sha256=bytes.fromhex(record["sha256"]), size=record["size"],
                                sample=base64.b64decode(record["sample"]))
    op._upload_mode = "lfs"
    op._is_uploaded = True
    return op
