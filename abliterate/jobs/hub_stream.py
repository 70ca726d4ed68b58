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
from dataclasses import replace
from pathlib import Path

import click

from abliterate.errors import AbliterateError

STATE_NAME = "stream-state.json"


def run_stream(options) -> str:
    """Returns the repo URL. `options` is run_options.RunOptions (push and a direction are required)."""
    from huggingface_hub import HfApi, hf_hub_download

    from abliterate.edit.plan import edit_options
    from abliterate.edit.weights import DIRECTION_NAME
    from abliterate.io import hub
    from abliterate.io.checkpoint import INDEX_NAME
    from abliterate.io.direction_file import load_direction
    from abliterate.jobs.run_options import default_out, public_model, regenerate_command
    from abliterate.options.recipe import load_recipe
    from abliterate.publish.card import CardInfo, DirectionSummary, EditSummary, render_card, sha256_file
    from abliterate.publish.push import check_target, target_repo

    say = (lambda _m: None) if options.quiet else (lambda m: click.echo(m, err=True))
    if not options.push:
        raise AbliterateError("--stream uploads as it goes: pass --push [REPO_ID] too")
    if hub.is_local(options.model):
        raise AbliterateError("--stream is for Hub models; for a local folder use `abliterate apply` (it already "
                              "streams tensor by tensor)")
    if options.adapter:
        raise AbliterateError("--stream writes weights; an --adapter is a few MB and needs no streaming")
    _check_commit_fields()
    repo_id = target_repo(options.repo_id, options.model)
    check_target(repo_id, force=options.force)
    work = options.out or default_out(options.model, False)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_NAME
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"model": options.model, "shards": {}}
    if state.get("model") != options.model:
        raise AbliterateError(f"{work} holds a streamed run of {state.get('model')}; choose another --out")

    hub.repo_files(options.model, options.revision)  # the clear errors for unknown repos and revisions
    # every shard from one commit, in this run and in a resumed one (the card's command then names it too)
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
    if INDEX_NAME in files:
        index = json.loads(Path(hf_hub_download(options.model, INDEX_NAME, revision=options.revision,
                                                local_dir=str(work / "meta"))).read_text())
        weight_map: dict[str, str] = index["weight_map"]
    else:
        weight_map = {}
    shards = sorted(set(weight_map.values())) or [f for f in files if f.endswith(".safetensors")]
    if not shards:
        raise AbliterateError(f"{options.model} has no .safetensors shards; abliterate loads safetensors only")
    direction = load_direction(direction_path, hidden_size=config.get("hidden_size") or
                               config.get("text_config", {}).get("hidden_size"))
    key = {"revision": options.revision, "repo": repo_id, "direction": sha256_file(Path(direction_path)),
           "recipe": recipe.name, "apply": repr(edit_options(recipe.apply))}
    if state["shards"] and state.get("key") != key:  # resuming with other inputs would publish a mixed model
        changed = ", ".join(k for k in key if (state.get("key") or {}).get(k) != key[k])
        raise AbliterateError(f"{work} holds an interrupted streamed run made with another {changed}; rerun it "
                              f"with the same inputs, or delete {work} to start over")
    state["key"] = key

    api = HfApi()
    url = str(api.create_repo(repo_id, private=options.private, exist_ok=True))
    out_config = config
    for n, shard in enumerate(shards, 1):
        if shard in state["shards"]:
            say(f"[{n}/{len(shards)}] {shard}: uploaded in an earlier run, skipped")
            continue
        say(f"[{n}/{len(shards)}] {shard}: download, edit, upload")
        record = _edit_and_upload(options, api, repo_id, work, meta, shard, weight_map, direction,
                                  replace(edit_options(recipe.apply), partial=True))
        state["shards"][shard] = record
        _save_state(state_path, state)
        shard_uploaded(shard)
    for record in state["shards"].values():
        if record.get("config"):
            out_config = record["config"]

    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(meta, final, ignore=shutil.ignore_patterns(".cache", "README.md", INDEX_NAME))
    (final / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    shutil.copyfile(direction_path, final / DIRECTION_NAME)
    if weight_map:
        new_map = {name: s for record in state["shards"].values() for name, s in record["tensors"].items()}
        (final / INDEX_NAME).write_text(json.dumps({"metadata": index.get("metadata", {}), "weight_map": dict(
            sorted(new_map.items()))}, indent=2) + "\n")
    from abliterate.publish.card import base_license, checksums, write_checksums

    # the shards are on the Hub only: their sums come from the state file
    sums = dict(sorted({**checksums(final), **{s: r["sha256"] for s, r in state["shards"].items()}}.items()))
    write_checksums(final, sums)
    card_text = (meta / "README.md").read_text(errors="replace") if (meta / "README.md").is_file() else None
    a = recipe.apply
    (final / "README.md").write_text(render_card(CardInfo(
        base_model=options.model, adapter=False, license=base_license(card_text),
        direction=DirectionSummary.of(direction.metadata,
                                      public_model(direction.metadata.get("model") or options.model)),
        edit=EditSummary(a.scale, a.layers, tuple(a.components), sum(r["edited"] for r in state["shards"].values()),
                         notes=("streamed shard by shard (--stream); not evaluated: run `abliterate evaluate` on "
                                "the result",), norm_preserve=a.norm_preserve),
        evaluation=None, regenerate=regenerate_command(options) + " --push --stream", recipe_name=recipe.name,
        files=sums)))

    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(str(p.relative_to(final)), str(p)) for p in sorted(final.rglob("*"))
                  if p.is_file()]
    operations += [_uploaded_operation(shard, record) for shard, record in state["shards"].items()]
    api.create_commit(repo_id, operations, commit_message="abliterate: edited checkpoint (streamed), direction, card "
                      "and checksums")
    shutil.rmtree(work)
    return url


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
