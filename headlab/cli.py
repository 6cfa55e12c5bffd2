"""The `headlab` command line: thin over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from headlab.errors import HeadlabError

app = typer.Typer(help="headlab: find, score and intervene on attention heads.", no_args_is_help=True, add_completion=False)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def info(
    model: str = typer.Argument(..., help="local model directory, hub name, or zoo:<name>"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code (off by default)"),
    revision: Optional[str] = typer.Option(None, help="hub revision"),
) -> None:
    """Print a model's ModelSpec and which patched-attention kernel it runs."""
    from headlab.model import load_model

    try:
        hm = load_model(model, trust_remote_code=trust_remote_code, revision=revision, load_tokenizer=False)
    except HeadlabError as exc:
        _fail(exc)
    typer.echo(hm.info())


@app.command()
def demo(
    out: Path = typer.Option(Path("runs"), help="runs directory to write into"),
    seed: int = typer.Option(2, help="which code needle (the model retrieves about 2 in 3; pruning the card's retrieval "
                                      "heads breaks nearly all, per the card)"),
    analyses: bool = typer.Option(True, help="also write one run of each head-scoring analysis (for `headlab app`)"),
) -> None:
    """Patched forward + generation with an intervention and stats on zoo:pycode-llama; prints a per-head table, writes runs."""
    import pandas as pd

    from headlab.demo import demo_analyses, run_demo

    try:
        result = run_demo(out=out, seed=seed)
        extra = demo_analyses(out) if analyses else []
    except HeadlabError as exc:
        _fail(exc)
    table = result.table
    wide = table.pivot_table(index=["layer", "head"], columns="run", values=["needle_mass", "first_mass", "entropy"])
    wide.columns = [f"{stat}:{run}" for stat, run in wide.columns]
    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.float_format", "{:.3f}".format):
        typer.echo(wide.reset_index().to_string(index=False))
    a = result.answers
    typer.echo(f"\nplan: {result.plan_text}")
    typer.echo(f"answer expected {a['expected']!r} | baseline {a['baseline']!r} | patched {a['patched']!r}")
    typer.echo(f"KL(patched || baseline) of the next token = {result.kl:.4g}")
    typer.echo(f"run written to {result.run_dir}")
    for run_dir in extra:
        typer.echo(f"analysis run written to {run_dir}")
    if extra:
        typer.echo(f"explore them: headlab app {out}")


score_app = typer.Typer(help="Score every head; writes a resumable run directory.", no_args_is_help=True)
intervene_app = typer.Typer(help="Calibrate an intervention on a calibration split, evaluate it on the rest.", no_args_is_help=True)
app.add_typer(score_app, name="score")
app.add_typer(intervene_app, name="intervene")

MODEL = typer.Argument(..., help="local model directory, hub name, or zoo:<name>")
OUT = typer.Option(Path("runs"), help="runs directory")
RUN_ID = typer.Option(None, help="name of the run; an unfinished run of that name is resumed")
METHOD = typer.Option("auto", help="head search: exact (every head) | atp (attribution estimate of every head, then the "
                                     "best verified exactly) | auto (atp from 512 candidate heads up)")
RAY = typer.Option(None, help="run the per-item work as Ray tasks: local (a cluster on this machine), auto (the "
                                  "running cluster) or ray://HOST:10001; scores equal the unsharded run's")
SHARDS = typer.Option(4, help="with --ray: how many tasks to split the work into")
RAY_GPUS = typer.Option(0.0, help="with --ray: GPUs per task (1: one task per GPU)")
VERIFY = typer.Option(32, help="with atp: heads re-evaluated exactly (the highest estimates; path patching: each end)")
SCREEN = typer.Option(32, help="with atp: candidates evaluated exactly (the largest estimated task-loss decrease)")
POPE_DATA = typer.Option(None, "--data", help="POPE-format JSONL/CSV: image (file name), text (question), label")
IMAGES = typer.Option(None, "--images", help="folder holding the dataset's images")
TEMPLATE = typer.Option(None, "--template", help="prompt with {question} and the image placeholder (default: LLaVA-1.5's)")


def _job(fn, *args, **kw) -> None:
    try:
        run_dir = fn(*args, **kw)
    except HeadlabError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished samples are kept; rerun with the same --run-id to resume", err=True)
        raise typer.Exit(code=130)
    summary = (run_dir / "summary.json").read_text()
    typer.echo(summary)
    typer.echo(f"run written to {run_dir}")


@score_app.command("retrieval")
def score_retrieval(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    needles: Optional[str] = typer.Option(None, help="JSONL/CSV with needle, question, answer"),
    haystack: Optional[str] = typer.Option(None, help="text file that fills the context"),
    lengths: Optional[list[int]] = typer.Option(None, help="context lengths (haystack words)"),
    depths: Optional[list[float]] = typer.Option(None, help="needle depths in [0, 1]"),
    teacher_forced: bool = typer.Option(False, help="one forward pass over prompt + answer instead of decoding"),
    max_new_tokens: int = typer.Option(16),
    accept: str = typer.Option("recall", help="recall: average the samples whose answer recalls > 50% of the needle's "
                                              "answer words (the reference) | all: every sample"),
    ray: Optional[str] = RAY, shards: int = SHARDS, ray_gpus: float = RAY_GPUS,
) -> None:
    """Retrieval heads (Wu et al. 2024): copy score during greedy decoding of the needle."""
    from headlab import jobs

    _job(jobs.score_retrieval, model, out, run_id, needles=needles, haystack=haystack, lengths=lengths, depths=depths,
         teacher_forced=teacher_forced, max_new_tokens=max_new_tokens, accept=accept, ray=ray, shards=shards,
         ray_gpus=ray_gpus)


@score_app.command("sinks")
def score_sinks(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="text file, one text per line"),
    n: int = typer.Option(20, help="zoo prompts when no --data"), tau: float = typer.Option(0.1),
) -> None:
    """Attention sinks: first-token mass, hidden sinks (r > tau), massive activations."""
    from headlab import jobs

    _job(jobs.score_sinks, model, out, run_id, data=data, n=n, tau=tau)


@score_app.command("patterns")
def score_patterns(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="text file, one text per line (default: a real-text zoo model's "
                                                  "held-out code; none for other models)"),
    random_inputs: int = typer.Option(16, "--random", help="inputs of a random token block repeated twice (0: none)"),
    length: int = typer.Option(128, help="tokens in each random block"),
    exclude_bos: bool = typer.Option(False, help="detect_head's exclude_bos"),
    exclude_current_token: bool = typer.Option(False, help="detect_head's exclude_current_token"),
    seed: int = typer.Option(0),
) -> None:
    """Previous-token, duplicate-token and induction heads (TransformerLens's detect_head), from patched stats."""
    from headlab import jobs

    _job(jobs.score_patterns, model, out, run_id, data=data, random_inputs=random_inputs, length=length,
         exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, seed=seed)


@score_app.command("probes")
def score_probes(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="JSONL/CSV with text and label (two labels)"),
    n: int = typer.Option(48, help="zoo prompts per label when no --data (zoo models trained on refusal)"),
    position: int = typer.Option(-1, help="token whose head outputs are probed (-1: the last)"),
    folds: int = typer.Option(5, help="stratified cross-validation folds"),
    positive: Optional[str] = typer.Option(None, help="the label that is class 1 (default: the second, sorted)"),
    seed: int = typer.Option(0),
) -> None:
    """Linear probes on head outputs (ITI, Li et al. 2023): per-head accuracy / AUROC, probe directions saved."""
    from headlab import jobs

    _job(jobs.score_probes, model, out, run_id, data=data, n=n, position=position, folds=folds, positive=positive,
         seed=seed)


@score_app.command("select-copy")
def score_select_copy(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="JSONL/CSV with question, options, answer"),
    n: int = typer.Option(200, help="zoo questions when no --data"),
    labels: str = typer.Option("letters", help="letters | digits | lower"),
    key_token: str = typer.Option("end", help="end (the option's last token, the paper) | label"),
    shots: int = typer.Option(0), prompt_format: Optional[str] = typer.Option(None, "--format", help="paper | zoo"),
) -> None:
    """Select-and-copy heads (Tulchinskii et al. 2024): QK-score per option, best head vs the letter baseline."""
    from headlab import jobs

    _job(jobs.score_select_copy, model, out, run_id, data=data, n=n, labels=labels, key_token=key_token, shots=shots,
         prompt_format=prompt_format)


@score_app.command("safety")
def score_safety(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    harmful: Optional[str] = typer.Option(None, help="JSONL/CSV of harmful prompts (column goal, input, prompt, instruction or query)"),
    harmless: Optional[str] = typer.Option(None, help="JSONL/CSV of harmless prompts (same columns), to check they stay answered"),
    column: Optional[str] = typer.Option(None, help="the prompt column, when it is none of the usual names"),
    n: int = typer.Option(48, help="zoo prompts per set when no --harmful"),
    ablation: str = typer.Option("attention", help="attention (undifferentiated attention, q x eps) | output (output x eps)"),
    epsilon: float = typer.Option(1e-4, help="ablation factor for Ships (the reference's 1e-4)"),
    sahara_epsilon: float = typer.Option(1e-5, help="ablation factor for Sahara (the reference's 1e-5)"),
    max_heads: int = typer.Option(3, help="Sahara's head-set size"),
    template: str = typer.Option("{prompt}", help="prompt template with {prompt}, or 'chat' for the chat template"),
    keywords: Optional[list[str]] = typer.Option(None, "--keyword", help="refusal keyword (repeat); default the reference's list"),
    min_chars: Optional[int] = typer.Option(None, help="generations shorter than this count as refusals (reference: 32)"),
    max_new_tokens: int = typer.Option(32),
    method: str = METHOD, verify: int = VERIFY,
    ray: Optional[str] = RAY, shards: int = SHARDS, ray_gpus: float = RAY_GPUS,
) -> None:
    """Safety heads (Zhou et al. 2025): Ships per head, Sahara's head set, refusal before/after ablating it."""
    from headlab import jobs

    _job(jobs.score_safety, model, out, run_id, harmful=harmful, harmless=harmless, column=column, n=n, ablation=ablation,
         epsilon=epsilon, sahara_epsilon=sahara_epsilon, max_heads=max_heads, template=template,
         keywords=keywords or None, min_chars=min_chars, max_new_tokens=max_new_tokens, method=method, verify=verify,
         ray=ray, shards=shards, ray_gpus=ray_gpus)


@score_app.command("conflict")
def score_conflict(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="JSONL/CSV with prompt, memory_answer, context_answer, corrupted_prompt"),
    n: int = typer.Option(64, help="zoo pairs when no --data"),
    method: str = METHOD, verify: int = VERIFY,
) -> None:
    """Knowledge-conflict heads: path patching each head to the logits; memory vs context heads."""
    from headlab import jobs

    _job(jobs.score_conflict, model, out, run_id, data=data, n=n, method=method, verify=verify)


@score_app.command("vision-heads")
def score_vision_heads(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = POPE_DATA, images: Optional[str] = IMAGES, template: Optional[str] = TEMPLATE,
    n: int = typer.Option(24, help="zoo questions per kind when no --data"),
    max_new_tokens: int = typer.Option(4),
) -> None:
    """Vision-aware heads (He et al.): VHD, head output with vs without the image, per generated token."""
    from headlab import jobs

    _job(jobs.score_vision_heads, model, out, run_id, data=data, images=images, template=template, n=n,
         max_new_tokens=max_new_tokens)


@intervene_app.command("vhr")
def intervene_vhr(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = POPE_DATA, images: Optional[str] = IMAGES, template: Optional[str] = TEMPLATE,
    n: int = typer.Option(48, help="zoo questions per set when no --data"),
    alpha: float = typer.Option(1.5, help="output scale of the reinforced heads (> 1 reinforces)"),
    k: int = typer.Option(2, help="heads reinforced per layer, chosen by VHD at every step"),
    max_new_tokens: int = typer.Option(3),
) -> None:
    """VHR: reinforce each step's top-k vision-aware heads per layer; accuracy / POPE metrics before and after."""
    from headlab import jobs

    _job(jobs.intervene_vhr, model, out, run_id, data=data, images=images, template=template, n=n, alpha=alpha, k=k,
         max_new_tokens=max_new_tokens)


@intervene_app.command("var")
def intervene_var(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = POPE_DATA, images: Optional[str] = IMAGES, template: Optional[str] = TEMPLATE,
    n: int = typer.Option(24, help="zoo questions per kind when no --data"),
    p: float = typer.Option(0.6, help="fraction of the visual sinks' attention redistributed"),
    tau: float = typer.Option(20.0, help="phi threshold of a visual sink token"),
    rho: float = typer.Option(0.6, help="visual non-sink ratio of an image-centric head"),
    layer: Optional[int] = typer.Option(None, help="hidden-state layer of the sink test (default: the middle)"),
    max_new_tokens: int = typer.Option(3),
) -> None:
    """VAR (Kang et al.): visual sink tokens, image-centric heads, attention redistributed; answers before and after."""
    from headlab import jobs

    _job(jobs.intervene_var, model, out, run_id, data=data, images=images, template=template, n=n, p=p, tau=tau, rho=rho,
         layer=layer, max_new_tokens=max_new_tokens)


@intervene_app.command("act")
def intervene_act(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="JSONL/CSV with prompt, choices, answer"),
    n: int = typer.Option(200, help="zoo samples when no --data"), calibration_fraction: float = typer.Option(0.5),
    beta: float = typer.Option(0.4), tau: float = typer.Option(0.1),
    layers: Optional[list[int]] = typer.Option(None, help="candidate layers (default 2..L-2)"), seed: int = typer.Option(0),
    method: str = METHOD, screen: int = SCREEN,
) -> None:
    """ACT: search the heads whose sink calibration helps, evaluate before/after."""
    from headlab import jobs

    _job(jobs.intervene_act, model, out, run_id, data=data, n=n, calibration_fraction=calibration_fraction, beta=beta,
         tau=tau, layers=layers or None, seed=seed, method=method, screen=screen)


@intervene_app.command("zerotuning")
def intervene_zerotuning(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    data: Optional[str] = typer.Option(None, help="JSONL/CSV with prompt, choices, answer"),
    n: int = typer.Option(200, help="zoo samples when no --data"), calibration_fraction: float = typer.Option(0.5),
    objective: str = typer.Option("accuracy", help="accuracy (supervised) | entropy (unsupervised)"),
    layers: Optional[list[int]] = typer.Option(None, help="candidate layers (default all)"), seed: int = typer.Option(0),
    method: str = METHOD, screen: int = SCREEN,
) -> None:
    """ZeroTuning: profile heads, pick the group and gamma on the calibration split, evaluate before/after."""
    from headlab import jobs

    _job(jobs.intervene_zerotuning, model, out, run_id, data=data, n=n, calibration_fraction=calibration_fraction,
         objective=objective, layers=layers or None, seed=seed, method=method, screen=screen)


@intervene_app.command("ph3")
def intervene_ph3(
    model: str = MODEL, out: Path = OUT, run_id: Optional[str] = RUN_ID,
    toward: str = typer.Option(..., help="context (prune memory heads) | memory (prune context heads)"),
    data: Optional[str] = typer.Option(None, help="JSONL/CSV with prompt, memory_answer, context_answer, corrupted_prompt"),
    n: int = typer.Option(128, help="zoo pairs when no --data"),
    k: Optional[int] = typer.Option(None, help="heads to prune (default: chosen on the calibration split)"),
    max_k: int = typer.Option(8, help="largest k tried when choosing k"),
    calibration_fraction: float = typer.Option(0.5), seed: int = typer.Option(0),
    method: str = METHOD, verify: int = VERIFY,
) -> None:
    """PH3 (Jin et al. 2024): prune memory or context heads found by path patching; memory/context rates before/after."""
    from headlab import jobs

    _job(jobs.intervene_ph3, model, out, run_id, toward=toward, data=data, n=n, k=k, max_k=max_k,
         calibration_fraction=calibration_fraction, seed=seed, method=method, verify=verify)


@app.command("app")
def app_command(
    runs: Path = typer.Argument(Path("runs"), help="the runs directory to explore"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (default: this machine only)"),
    port: int = typer.Option(0, help="port (0: a free one)"),
    model: Optional[list[str]] = typer.Option(None, help="extra model the playground may load (repeat)"),
    device: str = typer.Option("cpu", help="where head detail and the playground run models (cpu, cuda, cuda:1)"),
    allow_hub: bool = typer.Option(False, help="let pages load hub model names (downloads); default: zoo and local dirs only"),
    allowed_host: Optional[list[str]] = typer.Option(None, help="extra Host header name to accept (repeat), e.g. a "
                                                               "machine name when serving on 0.0.0.0"),
) -> None:
    """The head explorer in the browser: runs, heatmaps, comparison, head detail, playground, mask export."""
    try:
        from headlab.app import serve

        serve(runs, host=host, port=port, models=model or None, device=device, allow_hub=allow_hub,
              allowed_hosts=allowed_host or None,
              ready=lambda url: typer.echo(f"headlab app: {runs} at {url} (Ctrl-C stops)"))
    except ModuleNotFoundError as exc:
        _fail(HeadlabError(f"the app needs {exc.name}: pip install 'headlab[app]'"))
    except HeadlabError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("stopped")


@app.command()
def version() -> None:
    """Print headlab's and its main dependencies' versions."""
    from headlab.runs import versions

    for name, v in versions().items():
        typer.echo(f"{name} {v}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="headlab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
