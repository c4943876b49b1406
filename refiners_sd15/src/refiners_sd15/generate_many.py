"""`refiners generate` for many images: `--num-images N --batch-size B`, `--prompts FILE --out-dir DIR`,
`--from-image PNG`, and data-parallel runs under `torchrun`; a single image otherwise (`cli.run`).

A run reads its items (`generate_items`), checks each as `refiners generate` checks its command line
(`cli.check_arguments`: a bad item fails alone, reported, and the run goes on), skips those whose output is already
complete (`generate_outputs.is_complete`: how a rerun resumes), and groups the rest into batches of items that can be
denoised together (same model kind, plugin options, size, steps, solver and guidance; a kind's
`ModelSpec.generate_batch`, else one image at a time). The model is loaded once for each set of plugin options, in
the order they first appear. Batches are shared out by rank under torchrun (batch i to rank i % world size), so a run
over any number of processes makes the same batches, and the same pixels. Each image is written atomically as soon as
its batch is done: a killed run loses at most its batches in flight, and the temporary files it leaves are removed
when it is run again. The exit code is 1 if any item failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from refiners_core.plugins import registry
from refiners_sd15 import cli
from refiners_sd15.generate_checks import TEMPORARY_PREFIX, GenerateError, parse_device, parse_integer
from refiners_sd15.generate_items import (
    MAX_NUM_IMAGES,
    OPTION_DEST,
    Item,
    items_from_command_line,
    read_prompts_file,
)
from refiners_sd15.generate_outputs import is_complete, read_settings, remove_temporaries, write_atomically
from refiners_sd15.generate_ranks import Ranks, join_ranks
from refiners_sd15.generate_record import overrides_of, settings_of
from refiners_sd15.latent_diffusion import MAX_SEED
from refiners_sd15.solvers import StochasticSolver

MAX_BATCH_SIZE = 1024
DEFAULT_OUT_DIR = Path("generated")


@dataclass
class Job:
    """An item with its arguments, its checked settings (None if they failed) and its output."""

    item: Item
    args: argparse.Namespace
    out: Path
    checked: cli.GenerateSettings | None = None
    settings: dict[str, Any] = field(default_factory=dict[str, Any])


@dataclass
class Summary:
    """What a process did: images written, outputs already complete, failures as `(item, reason)`."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])


def run(args: argparse.Namespace) -> int:
    """`refiners generate`: many images when `--num-images`, `--batch-size`, `--prompts`, `--out-dir` or
    `--from-image` is given (returns 1 if an item failed), else one (`cli.run`). Raises GenerateError, before any
    model is loaded, for a bad command line or prompts file."""
    if args.from_image is not None:
        return _from_image(args)
    if args.model is None:
        raise GenerateError("--model is required (except with --from-image)")
    many = (args.num_images, args.batch_size, args.prompts, args.out_dir)
    if args.prompts is None and args.prompt is None:
        raise GenerateError("a prompt is required (or --prompts FILE, or --from-image PNG)")
    if args.prompts is not None and args.prompt is not None:
        raise GenerateError(f"give a prompt or --prompts {args.prompts}, not both")
    if all(value is None for value in many):
        return cli.run(args)
    if args.out != cli.DEFAULT_OUT:
        raise GenerateError("--out names one image: with many, give --out-dir DIR")
    return run_many(args)


def run_many(args: argparse.Namespace) -> int:
    """Make every item of the command line, as the module says; returns 1 if any failed, else 0."""
    start = time.perf_counter()
    num_images = parse_integer("--num-images", args.num_images or "1", 1, MAX_NUM_IMAGES)
    batch_size = parse_integer("--batch-size", args.batch_size or "1", 1, MAX_BATCH_SIZE)
    seed = parse_integer("--seed", args.seed or "0", 0, MAX_SEED, bounds="from 0 to 2**64-1")
    out_dir: Path = args.out_dir or DEFAULT_OUT_DIR
    device = parse_device(args.device)
    flags = [spec.flag for spec in cli.plugin_options()]
    cli.check_arguments(_namespace(args, {"prompt": args.prompt or "", "seed": str(seed), "out": out_dir / "x.png"}))
    if args.prompts is not None:
        solvers = sorted(registry().solvers)
        items = read_prompts_file(
            args.prompts,
            num_images=num_images,
            seed=seed,
            solvers=solvers,
            option_flags=flags,
            solver_name=cli.solver_name,
        )
    else:
        items = items_from_command_line(num_images, seed)
    ranks = join_ranks(device)
    try:
        if ranks.world_size > 1 and device.type == "cuda":
            args.device = f"cuda:{ranks.local_rank}"
        summary = _run_items(args, items, out_dir, flags, batch_size, ranks)
        summaries = ranks.gather(summary)
    finally:
        ranks.leave()
    total = Summary(
        done=sum(s.done for s in summaries),
        skipped=summaries[0].skipped,
        failed=[failure for s in summaries for failure in s.failed],
    )
    if ranks.rank == 0:
        _report(total, out_dir, time.perf_counter() - start)
    return 1 if total.failed else 0


def _run_items(
    args: argparse.Namespace, items: list[Item], out_dir: Path, flags: list[str], batch_size: int, ranks: Ranks
) -> Summary:
    summary = Summary()
    prefix = f"{TEMPORARY_PREFIX}rank{ranks.rank}-"
    remove_temporaries(out_dir, prefix)
    checked: list[Job] = []
    complete: set[str] = set()
    for item in items:
        out = out_dir / f"{item.id}.png"
        job = Job(item, _namespace(args, {**item.overrides, "out": out}), out)
        try:
            job.checked = cli.check_arguments(job.args)
            job.settings = settings_of(job.args, job.checked, flags)
        except GenerateError as error:  # every rank checks every item: rank 0 reports
            if ranks.rank == 0:
                summary.failed.append((item.id, f"{item.where}: {error}"))
            continue
        checked.append(job)
        if is_complete(job.out, job.settings):
            complete.add(item.id)
    summary.skipped = len(complete) if ranks.rank == 0 else 0
    ranks.barrier()  # every rank has seen which outputs were complete before any is written
    # batches are made of every item, complete or not, so that a resumed run denoises each image in the batch it
    # had in an uninterrupted run (same pixels); a batch whose images are all there is skipped
    batches = [batch for batch in _batches(checked, batch_size) if any(j.item.id not in complete for j in batch)]
    mine = batches[ranks.rank :: ranks.world_size]
    # rank 0's bar counts every rank's images: its own as it makes them, the others' as their files appear (written
    # atomically, so a file is a finished image; on machines without a shared folder it counts its own only)
    others = {
        job.out
        for index, batch in enumerate(batches)
        if index % ranks.world_size != ranks.rank
        for job in batch
        if job.item.id not in complete
    }
    own, others_done = 0, 0
    progress = tqdm(
        total=sum(1 for batch in batches for job in batch if job.item.id not in complete),
        unit="img",
        desc=f"generate ({ranks.world_size} processes)" if ranks.world_size > 1 else "generate",
        disable=ranks.rank != 0 or args.no_progress,
        file=sys.stderr,
    )
    with progress:
        for batch, model, extra in _with_models(mine, summary):
            missing = [job for job in batch if job.item.id not in complete]
            try:
                images = _generate(model, batch, extra)
            except Exception as error:  # a bad item fails its batch, and the run goes on
                summary.failed.extend((job.item.id, f"{job.item.where}: {_one_line(error)}") for job in missing)
            else:
                for job, image in zip(batch, images):
                    if job.item.id not in complete:
                        write_atomically(image, job.out, "PNG", settings=job.settings, prefix=prefix)
                        summary.done += 1
            own += len(missing)
            if not progress.disable:
                written = {out for out in others if out.exists()}  # each file looked for until it appears
                others -= written
                others_done += len(written)
                progress.update(own + others_done - progress.n)
    return summary


def _batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """`jobs` in batches of at most `batch_size` that can be denoised together, grouped by model state (the model is
    loaded once per state), each group in the order of its first job."""
    groups: dict[tuple[Any, ...], list[Job]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(_batch_key(job, index), []).append(job)
    state_order: dict[tuple[Any, ...], int] = {}
    for key in groups:
        state_order.setdefault(key[0], len(state_order))
    batches: list[tuple[int, list[Job]]] = []
    for key, group in groups.items():
        batches.extend((state_order[key[0]], group[i : i + batch_size]) for i in range(0, len(group), batch_size))
    return [batch for _, batch in sorted(batches, key=lambda pair: pair[0])]


def _batch_key(job: Job, index: int) -> tuple[Any, ...]:
    """What jobs denoised together share: the model state first, then the denoising settings; a job that cannot be
    batched gets a key of its own (`index`)."""
    checked = job.checked
    assert checked is not None
    state = (checked.kind, checked.mask is not None, job.args.model, job.args.refiner, _options(job.args))
    solver = checked.solver
    batchable = (
        cli.generate_kinds()[checked.kind].generate_batch is not None
        and checked.mask is None
        and checked.refiner is None
        and not isinstance(solver, StochasticSolver)
    )
    denoising = (checked.width, checked.height, solver.num_inference_steps, solver.first_inference_step)
    return (state, *denoising, job.args.solver, checked.guidance, None if batchable else index)


def _options(args: argparse.Namespace) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(
        (spec.flag, tuple(values))
        for spec in cli.plugin_options()
        if (values := getattr(args, OPTION_DEST + spec.flag, None))
    )


def _with_models(batches: list[list[Job]], summary: Summary) -> Iterator[tuple[list[Job], Any, dict[str, Any]]]:
    """Each batch with its loaded model (plugin options applied) and `generate`'s refiner arguments; a model is loaded
    when the state changes. The batches of a model that fails to load fail with it."""
    state: Any = object()
    model: Any = None
    extra: dict[str, Any] = {}
    failure: str | None = None
    for batch in batches:
        job = batch[0]
        checked = job.checked
        assert checked is not None
        key = _batch_key(job, 0)[0]
        if key != state:
            state, model, extra, failure = key, None, {}, None
            try:
                model, extra = _load(job.args, checked)
            except GenerateError as error:
                failure = _one_line(error)
        if failure is not None:
            summary.failed.extend((j.item.id, f"{j.item.where}: {failure}") for j in batch)
            continue
        yield batch, model, extra


def _load(args: argparse.Namespace, checked: cli.GenerateSettings) -> tuple[Any, dict[str, Any]]:
    extra: dict[str, Any] = {}
    if checked.refiner is not None:
        refiner = cli.load_refiner(checked.refiner, device=checked.device, dtype=checked.dtype)
        refiner.show_progress = False
        extra = {"refiner": refiner, "refiner_fraction": checked.refiner.fraction}
    inpainting = checked.mask is not None
    model = cli.load_model(checked.kind, args.model, inpainting=inpainting, device=checked.device, dtype=checked.dtype)
    cli.apply_plugin_options(model, args)
    model.show_progress = False
    return model, extra


def _generate(model: Any, batch: list[Job], extra: dict[str, Any]) -> list[Any]:
    """The images of `batch`: with the kind's `generate_batch` for several, `generate` for one."""
    first = batch[0]
    checked = first.checked
    assert checked is not None
    if len(batch) == 1:
        return [cli.generate_image(model, checked, first.args, **extra)]
    generate_batch = cli.generate_kinds()[checked.kind].generate_batch
    assert generate_batch is not None
    settings = [job.checked for job in batch if job.checked is not None]
    return generate_batch(
        model,
        prompts=[job.args.prompt for job in batch],
        negative_prompts=[job.args.negative for job in batch],
        seeds=[s.seed for s in settings],
        init_images=[s.init_image for s in settings],
        make_solver=cli.solver_factory(first.args.solver, checked),
        size=(checked.width, checked.height),
        guidance=checked.guidance,
        after_step=cli.finite_latents_check(checked.dtype),
    )


def _from_image(args: argparse.Namespace) -> int:
    """`--from-image PNG`: make again the image `PNG` records, to `--out`."""
    if args.prompt is not None or args.prompts is not None:
        raise GenerateError("--from-image takes its prompt from the image: give no prompt and no --prompts")
    settings = read_settings(args.from_image)
    cleared = {OPTION_DEST + spec.flag: None for spec in cli.plugin_options()}
    checked_args = _namespace(args, {**cleared, **overrides_of(settings)})
    return cli.run(checked_args)


def _namespace(args: argparse.Namespace, overrides: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **overrides})


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _report(summary: Summary, out_dir: Path, seconds: float) -> None:
    print(
        f"{summary.done} written, {summary.skipped} skipped (already complete), {len(summary.failed)} failed, "
        f"in {out_dir} in {seconds:.1f} s"
    )
    for item_id, reason in summary.failed:
        print(f"refiners generate: failed: {item_id}: {reason}", file=sys.stderr)
