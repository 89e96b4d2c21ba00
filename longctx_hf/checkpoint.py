"""Extend a checkpoint on disk without loading it: every method changes only config.json (and may add modeling
code), never a weight, so a 140 GB checkpoint is extended in milliseconds.

The new config comes from the same pure pieces `extend_context` uses (`hf_config`, `methods`), so it is the
config.json that `extend_context` + `save_pretrained` would write. Weights are hard-linked (copied when linking
fails). Everything is written into a temporary folder beside the destination and renamed at the end, so an
interrupted run leaves no half checkpoint. Never imports torch or transformers.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import engines, hf_config, hub, methods, model_card
from .repo_id import looks_like_repo_id

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
REPLACED = ("config.json", "README.md")  # written anew into the destination, never copied from the source


def extend_checkpoint(src, dst, method, factor=None, *, target_length=None,
                      original_max_position_embeddings=None, overwrite=False, in_place=False, eval_results=None,
                      link=True, revision=None, card_name=None, card_note=None, **options) -> Path:
    """Write `src` extended with `method` to the folder `dst` without loading a weight; returns `dst`.

    `src` is a checkpoint folder or a Hub repo id (downloaded into huggingface_hub's cache, at `revision` or the
    default branch, pinned to the commit its config.json came from, one weight format). `in_place=True`
    (dst None or src) rewrites `src` itself: only config.json and README.md change. `eval_results` is a
    results.json path (docs/results_schema.md) whose table and plots go into the model card. `link=False` copies the
    weights instead of hard-linking them. `card_name` is what the model card tells users to load (default: the
    output folder; the repo id when it will be pushed). `card_note`: a markdown section for the model card (e.g. how
    searched factors were found). Everything is validated before a file is written.
    """
    if in_place and not link:
        raise ValueError("link=False (CLI: --copy) copies weights into a new folder; in_place=True keeps the "
                         "source's files, so there is nothing to copy: drop one of them")
    module = methods.get_method(method)
    local, hub_id = _locate(src, allow_hub=not in_place)
    dst_dir = _check_destination(local, dst, overwrite=overwrite, in_place=in_place)
    if revision is not None and (local or not isinstance(revision, str)):
        raise ValueError(f"revision (a branch, tag or commit) applies to a Hub repo id src only, got {revision!r}")
    if local:
        config = _read_config(local / "config.json")
    else:  # only the config, not the weights, yet
        config_file, commit = hub.fetch_config(hub_id, revision)
        config = _read_config(config_file)
    spec, changes = hf_config.plan_extension(config, module, factor=factor, target_length=target_length,
                                             original_max_position_embeddings=original_max_position_embeddings,
                                             options=options)
    new_config = hf_config.apply_to_dict(config, changes)
    remote_files = methods.remote_code_files(module)
    results, plots = model_card.load_eval_results(eval_results) if eval_results is not None else (None, {})

    clashes = sorted(name for name in plots if local and not in_place and (local / name).exists())
    if clashes:  # in place, a plot replaces the previous run's plot of the same name; here it would hide SRC's file
        raise ValueError(f"eval_results plot names clash with files of src: {', '.join(clashes)}; rename the plots")
    src_dir = local or hub.download(hub_id, commit, WEIGHT_SUFFIXES)  # only now, once everything is valid, the whole repo
    card = model_card.render(new_config, base_model=hub_id or model_card.repo_id_in(config),
                             source_card=src_dir / "README.md", eval_results=results, plots=plots,
                             remote_code=bool(remote_files), name=card_name or str(dst_dir), note=card_note)
    files = {"config.json": json.dumps(new_config, indent=2, sort_keys=True) + "\n", "README.md": card,
             **remote_files}
    engines.warn_about_engines(hf_config.describe(new_config))
    if in_place:
        _replace_files(src_dir, files, plots)
        return dst_dir
    with _staging(dst_dir) as staging:
        # Files written here are never linked first: writing into a hard link would write into the source.
        _link_tree(src_dir, staging, skip=set(files) | set(plots) | _our_remote_code_files(), link=link)
        for name, text in files.items():
            (staging / name).write_text(text)
        for name, path in plots.items():
            shutil.copy2(path, staging / name)
    return dst_dir


def _our_remote_code_files() -> set:
    """Modeling files a previous extension of ours may have shipped: not carried over unless the new method writes
    them again (an orphan file without its auto_map entry would only confuse)."""
    return {name for module in methods.METHODS.values() for name in module.REMOTE_FILES}


def _locate(src, *, allow_hub: bool) -> tuple[Path | None, str | None]:
    """(local folder, None) or (None, Hub repo id): a local folder wins, like transformers' from_pretrained."""
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a checkpoint folder or a Hub repo id, got {type(src).__name__} {src!r}")
    path = Path(src)
    if path.is_dir():
        return path.resolve(), None
    if path.exists() or not looks_like_repo_id(str(src)):
        raise ValueError(f"src must be a checkpoint folder or a Hub repo id (owner/name); {str(src)!r} is neither")
    if not allow_hub:
        raise ValueError("in_place needs a local checkpoint folder, not a Hub repo id")
    return None, str(src)


def _read_config(config_file: Path) -> dict:
    if not config_file.is_file():
        raise ValueError(f"src has no config.json: {config_file.parent}")
    return json.loads(config_file.read_text())


def _check_destination(src_dir: Path | None, dst, *, overwrite: bool, in_place: bool) -> Path:
    """The destination folder, after refusing every combination that could overwrite or lose user files."""
    if in_place:
        if dst is not None and Path(dst).resolve() != src_dir:
            raise ValueError("in_place=True rewrites src itself; leave dst empty (or equal to src)")
        return src_dir
    if dst is None:
        raise ValueError("dst (the output folder) is required unless in_place=True")
    dst_dir = Path(dst).resolve()
    if dst_dir == src_dir:
        raise ValueError("dst is src; pass in_place=True (CLI: --in-place) to rewrite the source checkpoint")
    if src_dir is not None and src_dir in dst_dir.parents:
        raise ValueError(f"dst must not be inside src ({dst_dir} is inside {src_dir})")
    if src_dir is not None and dst_dir in src_dir.parents:
        raise ValueError(f"dst must not contain src ({src_dir} is inside {dst_dir})")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise ValueError(f"dst exists and is not a folder: {dst_dir}")
    entries = sorted(path.name for path in dst_dir.iterdir()) if dst_dir.is_dir() else []
    if entries and not overwrite:
        raise ValueError(f"dst is not empty: {dst_dir}; pass overwrite=True (CLI: --overwrite) to replace it")
    if entries and "config.json" not in entries:  # e.g. `--output models/`: never delete a folder of other things
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"overwrite only replaces a checkpoint folder (one with a config.json); dst {dst_dir} is "
                         f"not one (it holds {shown}); choose a new or empty folder")
    return dst_dir


class _staging:
    """A temporary folder beside `dst`, renamed onto it only when complete; removed on any error."""

    def __init__(self, dst: Path):
        self.dst = dst

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.path = _unique_sibling(self.dst, "partial")
        os.mkdir(self.path)  # mode 0o777 minus the umask, like any folder the user creates
        if self.dst.is_dir():
            os.chmod(self.path, self.dst.stat().st_mode)  # overwrite: keep the folder's permissions
        return self.path

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        try:
            _replace_folder(self.path, self.dst)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return False


def _unique_sibling(path: Path, label: str) -> Path:
    """A hidden name beside `path` (same filesystem, so renames are atomic and hard links work)."""
    return path.with_name(f".{path.name}.{label}-{os.urandom(4).hex()}")


def _replace_folder(new: Path, dst: Path) -> None:
    """Rename `new` onto `dst`; an existing `dst` is moved aside first and deleted only once `new` is in place."""
    if not dst.exists():
        os.rename(new, dst)
        return
    old = _unique_sibling(dst, "old")
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old)


def _replace_files(folder: Path, files: dict, plots: dict) -> None:
    """In place: each new file is written beside its target and renamed onto it (atomic per file). The folder
    itself never moves, so `.git/`, `.cache/`, symlinked subfolders and every other file stay as they are.

    config.json goes last: until it is replaced, the checkpoint is still the old one (with at most a new card).
    """
    for name in sorted(plots):
        _replace_file(folder / name, lambda target, source=plots[name]: shutil.copy2(source, target))
    for name in sorted(files, key=lambda name: name == "config.json"):
        _replace_file(folder / name, lambda target, text=files[name]: target.write_text(text))


def _replace_file(path: Path, write) -> None:
    """Write a fresh file (a new inode: a hard link to the old one keeps the old bytes) and rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _unique_sibling(path, "partial")
    try:
        write(temporary)
        if path.exists():
            os.chmod(temporary, path.stat().st_mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _link_tree(src: Path, dst: Path, *, skip: set, link: bool) -> None:
    """Hard-link weight files (copy if linking fails or link=False) and copy every other file, except `skip`.

    Small files are copied so that editing the new tokenizer or generation config never edits the source's. A
    symlinked subfolder is followed and its files linked/copied like the rest (a symlink would share the files
    with the source, and a relative one could dangle). `.git/` and `.cache/` (huggingface_hub's download
    bookkeeping) belong to the source folder, not to the new checkpoint, and are left out.
    """
    visited = set()
    for root, folders, names in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink loop, or two links to one folder: its files are already there
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = [f for f in folders if f not in (".cache", ".git")]
        relative = Path(root).relative_to(src)
        (dst / relative).mkdir(parents=True, exist_ok=True)
        for name in names:
            if relative == Path(".") and name in skip:
                continue
            source, target = Path(root) / name, dst / relative / name
            if link and name.endswith(WEIGHT_SUFFIXES):
                try:
                    os.link(source.resolve(), target)  # the real blob, not huggingface_hub's cache symlink
                    continue
                except OSError:
                    pass  # cross-device, or a filesystem without hard links
            shutil.copy2(source, target)
