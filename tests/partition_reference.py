"""Same decisions, byte for byte: the partition files the measured partitioner writes, kept and compared.

Not a test (it takes minutes): a check to run before and after changing the partitioner's code
(hessian_blocks/partitions/). It writes, with fixed seeds,

- the CLI's partition file (and its table, and the measured couplings) for the bundled models with
  the CLI defaults and cheaper settings, ``--small`` (given fields and ``auto``, a bundled model
  and the Pythia-shaped Hugging Face config of docs/partitioner.md) and ``--max-slices``;
- the library's rules (with their ``why``, the table's summary and evidence) for the Hugging Face
  configs and the planted Hessians the tests use, ``small=`` mappings included;
- every kept couplings file decided again under other decision settings (each setting moved
  alone), which reaches decision paths the defaults do not,

so that every candidate family (equal groups, groups with single slices, repeated per-head
layouts, near-diagonal whole/elements, stacked parts, diffuse and coupled whole) and the
small-to-full mapping are covered::

    python -m tests.partition_reference write DIR      # before the change (5-15 minutes on 2 shared cores)
    python -m tests.partition_reference check DIR      # after it: writes again and compares byte for byte
    python -m tests.partition_reference check DIR --quick   # without the two long runs (a few minutes)
    python -m tests.partition_reference check DIR --cases planted hf-gpt2   # a few cases only

``check`` exits 1 and names every file that differs (couplings files are compared array by array:
the zip container stamps the time). It runs on one thread, so that sums are taken in the same order.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hessian_blocks.cli import main as cli
from hessian_blocks.partitions import derive_partition, render, small_overrides
from hessian_blocks.partitions.coupling import load_couplings
from hessian_blocks.partitions.decide import DecisionSettings, decide_rule
from hessian_blocks.partitions.measured import derive_decisions

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT = ["--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=4", "--set", "vocab_size=64",
            "--set", "context=16", "--data", "synthetic"]
PYTHIA_160M = ["--set", "hidden_size=768", "--set", "num_hidden_layers=12", "--set", "num_attention_heads=12",
               "--set", "intermediate_size=3072"]
# (name, CLI arguments after "partition"); each also keeps its couplings and is decided again (SETTINGS)
CLI_CASES: dict[str, list[str]] = {
    "gpt2-nano-default": ["--model", "gpt2-nano"],
    "gpt2-nano-tiny": ["--model", "gpt2-nano", *TINY_GPT],
    "gpt2-nano-tiny-probes4": ["--model", "gpt2-nano", *TINY_GPT, "--probes", "4", "--seed", "3"],
    "gpt2-nano-max-slices-8": ["--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=16", "--set",
                               "vocab_size=64", "--set", "context=8", "--max-slices", "8"],
    "gpt2-nano-small-fields": ["--model", "gpt2-nano", "--set", "n_layer=2", "--set", "n_embd=16", "--set",
                               "n_head=2", "--set", "vocab_size=32", "--set", "context=8", "--small", "n_layer=1",
                               "--data", "synthetic", "--probes", "1", "--dtype", "float32"],
    "gpt2-nano-small-auto": ["--model", "gpt2-nano", "--set", "n_layer=3", "--set", "n_embd=16", "--set", "n_head=4",
                             "--set", "vocab_size=32", "--set", "context=8", "--data", "synthetic", "--small", "auto"],
    "bert-mini-tiny": ["--model", "bert-mini", "--set", "n_layer=2", "--set", "n_embd=32", "--set", "vocab_size=64",
                       "--set", "context=16", "--data", "synthetic"],
    "vit-tiny-tiny": ["--model", "vit-tiny", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "image_size=8",
                      "--set", "channels=1", "--data", "synthetic"],
    "mlp": ["--model", "mlp"],
    "mlp-mixer-tiny": ["--model", "mlp-mixer", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "image_size=8",
                       "--set", "channel_hidden=32", "--set", "token_hidden=8", "--data", "synthetic"],
    "resnet18-tiny": ["--model", "resnet18", "--set", "width=4", "--set", "layers=[1, 1]", "--set", "image_size=8",
                      "--data", "synthetic"],
    "hf-pythia-160m-small-auto": ["--model", "hf:GPTNeoXForCausalLM", *PYTHIA_160M, "--small", "auto"],
}
LONG = ("gpt2-nano-default", "hf-pythia-160m-small-auto")   # 1-8 minutes each, the others seconds
# decision settings moved one at a time, for every kept couplings file
SETTINGS: dict[str, dict] = {
    "threshold-0.3": {"threshold": 0.3}, "threshold-0.6": {"threshold": 0.6},
    "contrast-2": {"contrast": 2.0}, "contrast-8": {"contrast": 8.0}, "max-runs-1": {"max_runs": 1},
    "mass-threshold-0.05": {"mass_threshold": 0.05}, "mass-threshold-0.4": {"mass_threshold": 0.4},
    "max-spread-3": {"max_spread": 3.0}, "max-spread-1e6": {"max_spread": 1e6},
}


def table_rows(decisions) -> list[dict]:
    """What the CLI's table and a partition file say of each decision."""
    return [{**row, "rule": d.rule.to_dict()} for row, d in zip(render.table_rows(decisions), decisions)]


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def run_cli(name: str, args: list[str], out: Path) -> None:
    """The CLI's file, its printed table (paths made relative) and its couplings, then the couplings
    decided again under each of SETTINGS."""
    partition, couplings = out / f"{name}.json", out / f"{name}.couplings.npz"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli(["partition", *args, "--no-progress", "--out", str(partition), "--couplings", str(couplings)])
    if code != 0:
        raise SystemExit(f"{name}: the CLI exited with {code}")
    (out / f"{name}.table.txt").write_text(printed.getvalue().replace(str(out), "OUT"))
    measured = load_couplings(couplings)
    for label, settings in SETTINGS.items():
        write_json(out / f"{name}.decided.{label}.json",
                   [decide_rule(c, DecisionSettings(**settings)).rule.to_dict() for c in measured.values()])


def lm_loss(output, targets):
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def hf_case(out: Path, name: str) -> None:
    """The Hugging Face configs of tests/test_partitioner_hf.py, every tensor measured (or mapped)."""
    from tests import test_partitioner_hf as hf

    fast = dict(hf.FAST, max_probes=8)
    plain, masked = hf.token_batches(masked=False), hf.token_batches(masked=True)
    if name == "hf-gpt2":
        write_json(out / f"{name}.json", table_rows(derive_decisions(hf.gpt2(), lm_loss, plain, **fast)))
    elif name == "hf-gpt2-untied":
        write_json(out / f"{name}.json", table_rows(derive_decisions(hf.gpt2(False), lm_loss, plain, **fast)))
    elif name == "hf-bert":
        config = hf.transformers.BertConfig(
            vocab_size=hf.VOCAB, hidden_size=hf.WIDTH, num_hidden_layers=2, num_attention_heads=hf.HEADS,
            intermediate_size=4 * hf.WIDTH, max_position_embeddings=hf.CONTEXT, attn_implementation="eager",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        model = hf.transformers.BertForMaskedLM(config).double().eval()
        write_json(out / f"{name}.json", table_rows(derive_decisions(model, lm_loss, masked, seed=1, **fast)))
    elif name == "hf-phi3":
        config = hf.transformers.Phi3Config(
            vocab_size=hf.VOCAB, hidden_size=hf.WIDTH, num_hidden_layers=1, num_attention_heads=hf.HEADS,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=hf.CONTEXT,
            attn_implementation="eager", pad_token_id=0, eos_token_id=0, bos_token_id=0)
        torch.manual_seed(0)
        model = hf.transformers.Phi3ForCausalLM(config).double().eval()
        write_json(out / f"{name}.json", table_rows(derive_decisions(model, lm_loss, plain, **fast)))
    elif name == "hf-gpt-neox":
        for seed in (0, 2):
            write_json(out / f"{name}-seed{seed}.json",
                       table_rows(derive_decisions(hf.gpt_neox(1, hf.HEADS, seed), lm_loss, plain, seed=seed, **fast)))
    elif name == "hf-small-auto":
        full_config = hf.transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=hf.VOCAB, max_position_embeddings=hf.CONTEXT, attn_implementation="eager")
        torch.manual_seed(0)
        full = hf.transformers.LlamaForCausalLM(full_config).double().eval()
        small = hf.transformers.LlamaForCausalLM(hf.transformers.LlamaConfig(
            **{**full_config.to_dict(), **small_overrides(full_config)})).double().eval()
        derive_partition(full, lm_loss, None, small=small, small_data=plain, **hf.FAST).save(out / "hf-llama-auto.json")
        neox = hf.gpt_neox(2, 2 * hf.HEADS)
        write_json(out / "hf-gpt-neox-overrides.json", small_overrides(neox.config))
        derive_partition(neox, lm_loss, None, small=hf.gpt_neox(2, 2), small_data=plain,
                         **hf.FAST).save(out / "hf-gpt-neox-auto.json")


def planted_case(out: Path, name: str) -> None:
    """The planted Hessians of tests/test_partitioner*.py (every family, exactly known), and the
    scrambled bundled models of tests/test_partitioner.py."""
    from hessian_blocks import build_model, make_batches
    from tests import test_partitioner as tp
    from tests import test_partitioner_sampling as ts
    from tests.oracles import planted_loss

    if name == "planted":
        model = tp.Planted()
        batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
        for method, probes in (("dense", 2), ("probes", 3), ("probes", 1)):
            decisions = derive_decisions(model, planted_loss(model.matrices), batches, method=method, probes=probes)
            write_json(out / f"planted-{method}-{probes}.json", table_rows(decisions))
        long = ts.PlantedLong()
        for max_slices in (16, 0):
            decisions = derive_decisions(long, planted_loss(long.matrices), ts.BATCHES, max_slices=max_slices, probes=2,
                                     max_probes=4, dense_max=0)
            write_json(out / f"planted-long-{max_slices}.json", table_rows(decisions))
    elif name == "scrambled":
        for model_name, config in tp.CONFIGS.items():
            spec = build_model(model_name, dtype=torch.float64, **config)
            batches = make_batches(spec, "synthetic", batch_size=8, n_batches=1, dtype=torch.float64)
            scrambled = tp.Scrambled(spec.model, seed=1)
            write_json(out / f"scrambled-{model_name}.json",
                       table_rows(derive_decisions(scrambled, spec.loss_fn, batches, **tp.FAST)))


LIBRARY_CASES: dict[str, Callable[[Path, str], None]] = {
    **dict.fromkeys(("planted", "scrambled"), planted_case),
    **dict.fromkeys(("hf-gpt2", "hf-gpt2-untied", "hf-bert", "hf-phi3", "hf-gpt-neox", "hf-small-auto"), hf_case),
}


def write(out: Path, cases: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        start = time.perf_counter()
        if case in CLI_CASES:
            run_cli(case, CLI_CASES[case], out)
        else:
            LIBRARY_CASES[case](out, case)
        print(f"{case}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def differences(reference: Path, again: Path) -> list[str]:
    """The files of ``again`` that differ from (or are missing in) ``reference``."""
    differ = []
    for path in sorted(again.iterdir()):
        kept = reference / path.name
        if not kept.exists():
            differ.append(f"{path.name}: not in {reference}")
        elif path.suffix == ".npz":
            with np.load(kept) as a, np.load(path) as b:
                if sorted(a.files) != sorted(b.files) or any(not np.array_equal(a[k], b[k]) for k in a.files):
                    differ.append(f"{path.name}: other numbers")
        elif kept.read_bytes() != path.read_bytes():
            differ.append(f"{path.name}: other bytes")
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("folder", type=Path, help="the reference files (written by 'write', read by 'check')")
    parser.add_argument("--cases", nargs="*", choices=[*CLI_CASES, *LIBRARY_CASES],
                        help="only these cases (default: every one)")
    parser.add_argument("--quick", action="store_true", help=f"every case but {' and '.join(LONG)}")
    args = parser.parse_args()
    torch.set_num_threads(1)   # one thread: the same reduction order in every run
    cases = args.cases or [case for case in [*CLI_CASES, *LIBRARY_CASES] if not (args.quick and case in LONG)]
    if args.action == "write":
        write(args.folder, cases)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder), cases)
        differ = differences(args.folder, Path(folder))
        count = len(list(Path(folder).iterdir()))
    print("\n".join(differ) or f"all {count} files of {len(cases)} cases are the same, byte for byte")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
