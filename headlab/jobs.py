"""Analyses and interventions as resumable run directories (what `headlab score` / `headlab intervene` do).

Each job loads the model, builds its dataset (a user file, or the zoo's own task for zoo models),
runs the analysis with a `Checkpoint` in the run directory — so an interrupted job started again
with the same `run_id` skips every finished sample or head evaluation — and writes the results
atomically: manifest, scores (safetensors + JSON), per-sample parquet, heatmap figures, a JSON
summary and, for interventions, the calibrated plan.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from headlab.attribution import resolve_method
from headlab.checkpoint import Checkpoint
from headlab.errors import HeadlabError, RunLockedError
from headlab.model import HeadModel, load_model, load_spec
from headlab.runs import MANIFEST, Run, read_manifest

CHECKPOINT = "progress.jsonl"

ENGLISH_TEXTS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and after a long debate it approved the plan.",
    "Rivers carry sediment from the mountains to the sea, building deltas where the current slows and the sand settles.",
    "She opened the old book carefully, because its pages were brittle and the ink had faded to a pale brown.",
    "In the afternoon the market fills with people buying bread, fruit and fish, and the noise carries across the square.",
]
"""Default texts of the sinks job for models with an English tokenizer (zoo:minilm-l6)."""


def _is_zoo_task_model(ref: str) -> bool:
    """A bundled model trained on the synthetic tasks of `headlab.zoo.tasks` (its jobs use those tasks)."""
    from headlab import zoo

    if not ref.startswith("zoo:"):
        return False
    name = ref[4:]
    return (name not in zoo.PACKAGED and not zoo.is_corpus_model(name) and not zoo.is_vision_model(name)
            and (zoo.path(name) / "training.json").is_file())


def _is_corpus_model(ref: str) -> bool:
    """A bundled model trained on real text (zoo:pycode-llama): its jobs use `headlab.analyses.code_tasks`."""
    from headlab import zoo

    return ref.startswith("zoo:") and zoo.is_corpus_model(ref[4:])


NOT_APPLICABLE = {
    "select_copy": "it was trained on Python source only and has no multiple-choice format to read labels from",
    "refusal": "it was trained on Python source only and has no refusal behaviour to find safety heads for",
}


def _check_grid(lengths: list[int] | None, depths: list[float] | None) -> None:
    """--lengths are positive token/word counts, --depths fractions of the context."""
    bad = [x for x in lengths or [] if isinstance(x, bool) or not isinstance(x, int) or x < 1]
    if bad:
        raise HeadlabError(f"--lengths must be positive integers (context lengths), got {bad}")
    bad = [x for x in depths or [] if not 0.0 <= x <= 1.0]
    if bad:
        raise HeadlabError(f"--depths must be fractions of the context in [0, 1], got {bad}")


def _check_fraction(value: float, option: str = "--calibration-fraction") -> None:
    if not 0.0 < value < 1.0:
        raise HeadlabError(f"{option} must be in (0, 1) (the share of samples used to calibrate), got {value}")


def _check_count(value: int, option: str, low: int = 1) -> None:
    if isinstance(value, bool) or value < low:
        raise HeadlabError(f"{option} must be at least {low}, got {value}")


def _check_method(method: str, count: int, option: str) -> None:
    """--method and its --verify / --screen count, checked before a run is opened."""
    if method not in ("exact", "atp", "auto"):
        raise HeadlabError(f"--method must be exact, atp or auto, got {method!r}")
    _check_count(count, option, low=0 if option == "--verify" else 1)


def _shard_on_ray(cache: Any, keys: list[str], work: Any, ray: str | None, shards: int, ray_gpus: float,
                  progress: bool) -> None:
    """With --ray: compute the items of `keys` on Ray tasks into the run's checkpoint first."""
    if ray is None:
        return
    from headlab.distributed import fill_on_ray

    fill_on_ray(cache, keys, work, shards=shards, address=ray, gpus_per_task=ray_gpus, progress=progress)


def _check_ray(ray: str | None, shards: int) -> None:
    if ray is not None:
        if not ray.strip():
            raise HeadlabError("--ray needs an address: local (a cluster on this machine), auto (the running one) or "
                               "ray://HOST:10001")
        _check_count(shards, "--shards")


def _search_summary(params: dict[str, Any]) -> dict[str, Any]:
    """What a run's summary says of how its heads were searched (method, exact count, estimate error)."""
    return {k: params[k] for k in ("method", "verify", "screen", "verification", "top_token_mass") if k in params}


def open_run(root: str | Path, analysis: str, model: str, params: dict[str, Any], run_id: str | None) -> Run:
    """A new run, or the unfinished run `run_id` to resume (its analysis, model and params must match).

    The run's lock is taken first (RunLockedError if another live process writes that run) and
    the resume checks read the manifest under it, so two processes started with one --run-id can
    neither both run nor mix their results. The caller releases it (`started` does)."""
    params = json.loads(json.dumps(params))  # tuples -> lists, as they read back from the manifest
    run = Run(root, analysis, model, params, run_id=run_id)
    while True:
        try:
            run.acquire()
            break
        except RunLockedError:
            if run_id is not None:
                raise
            # an automatic id another process took in the same second: the next free name (it now
            # exists, so each new Run picks a later one)
            run = Run(root, analysis, model, params)
    try:
        if run_id is not None and (run.dir / MANIFEST).is_file():
            old = read_manifest(run.dir)
            if old.get("status") == "finished":
                raise HeadlabError(f"run {run_id!r} already finished; choose another --run-id (or delete {run.dir})")
            for key, new in (("analysis", analysis), ("model", model), ("params", params)):
                if old.get(key) != new:
                    raise HeadlabError(f"cannot resume run {run_id!r}: its {key} was {old.get(key)!r}, now {new!r}; "
                                       "rerun with the same arguments or choose another --run-id")
            run.manifest["resumed"] = int(old.get("resumed", 0) or 0) + 1
    except BaseException:
        run.release()
        raise
    return run


@contextmanager
def started(root: str | Path, analysis: str, model: str, params: dict[str, Any],
            run_id: str | None) -> Iterator[tuple[Run, HeadModel]]:
    """(run, model) for a job's body: the run opened and locked before the model loads (a finished,
    mismatched or busy run fails fast), the run's context entered around the body, and the lock
    released however the job ends."""
    run = open_run(root, analysis, model, params, run_id)
    try:
        hm = load_model(model)
        with run:
            yield run, hm
    finally:
        run.release()


def _finish(run: Run, summary: dict, scores: dict, frame: Any = None) -> Path:
    for name, s in scores.items():
        run.save_scores(s, name)
        run.save_figure(s.plot(), name)
    if frame is not None:
        run.save_samples(frame)
    run.save_json(summary, "summary")
    return run.dir


def score_retrieval(model: str, out: str | Path = "runs", run_id: str | None = None, *, needles: str | None = None,
                    haystack: str | None = None, lengths: list[int] | None = None, depths: list[float] | None = None,
                    teacher_forced: bool = False, max_new_tokens: int = 16, accept: str = "recall",
                    ray: str | None = None, shards: int = 4, ray_gpus: float = 0, progress: bool = True) -> Path:
    from headlab.analyses import retrieval

    _check_ray(ray, shards)
    config = retrieval.RetrievalConfig(teacher_forced=teacher_forced, max_new_tokens=max_new_tokens, accept=accept)  # type: ignore[arg-type]
    params = {"needles": needles, "haystack": haystack, "lengths": lengths, "depths": depths,
              "teacher_forced": teacher_forced, "max_new_tokens": max_new_tokens, "accept": accept}
    _check_grid(lengths, depths)
    _check_count(max_new_tokens, "--max-new-tokens")
    if needles or haystack:
        if not (needles and haystack):
            raise HeadlabError("give both --needles (JSONL/CSV of needle, question, answer) and --haystack (a text file)")
        samples = retrieval.build_dataset(needles, haystack, lengths or (1000, 2000, 4000), depths or (0.0, 0.5, 1.0))
    elif _is_zoo_task_model(model):
        samples = retrieval.zoo_dataset(lengths or (64, 256), depths or (0.0, 0.5, 1.0), per_cell=2)
    elif _is_corpus_model(model):
        from headlab.analyses import code_tasks

        samples = code_tasks.needle_samples(None, lengths or (128, 256, 512, 896),
                                            depths or (0.0, 0.25, 0.5, 0.75, 1.0), per_cell=2)
    else:
        raise HeadlabError(f"{model} is not a zoo task model: give --needles and --haystack files")
    with started(out, "retrieval", model, params, run_id) as (run, hm):
        cache = Checkpoint(run.dir / CHECKPOINT)
        from headlab.distributed import shard_work

        _shard_on_ray(cache, [str(i) for i in range(len(samples))], shard_work(retrieval.shard, model, samples, config),
                      ray, shards, ray_gpus, progress)
        result = retrieval.score(hm, samples, config, progress=progress, cache=cache)
        heads = [[l, h, s] for l, h, s in result.scores.top(10)] if result.accepted else []
        summary = {"samples": len(samples), "accuracy": float(result.samples["correct"].mean()),
                   "accept": accept, "accepted_samples": len(result.accepted), "accepted": result.accepted,
                   "top_heads": heads, "retrieval_heads": [[l, h] for l, h, s in heads if s > config.threshold]}
        if not result.accepted:
            summary["note"] = ("no sample was retrieved (answer recall <= 0.5 everywhere): no head has a score; "
                               "check the needles, or use --accept all")
        run.save_per_sample({"scores": result.per_sample}, [f"sample {i}" for i in range(len(samples))])
        run.save_examples([{"text": s.prompt, "label": f"sample {i}: answer {s.answer!r}",
                            "spans": {"needle": (int(r["needle_start"]), int(r["needle_end"]))}}
                           for i, (s, r) in enumerate(zip(samples, result.samples.to_dict("records")))])
        return _finish(run, summary, {"scores": result.scores}, result.samples)


def score_sinks(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                n: int = 20, tau: float = 0.1, progress: bool = True) -> Path:
    from headlab.analyses import sinks

    params = {"data": data, "n": n, "tau": tau}
    if data:
        texts = sinks.build_dataset(path=data)
    elif _is_zoo_task_model(model):
        from headlab.zoo import tasks

        texts = [ex.prompt for task in ("needle", "mcqa") for ex in tasks.held_out(task, max(1, n // 2), seed=30_000)]
    elif _is_corpus_model(model):
        from headlab.zoo import corpus

        texts = corpus.texts(None, n, max_tokens=512)
    elif model == "zoo:minilm-l6":
        texts = ENGLISH_TEXTS
    else:
        raise HeadlabError(f"give --data (a text file, one text per line) for {model}")
    with started(out, "sinks", model, params, run_id) as (run, hm):
        report = sinks.score(hm, texts, sinks.SinksConfig(tau=tau), progress=progress, cache=Checkpoint(run.dir / CHECKPOINT))
        summary = {"texts": len(texts), "fraction_of_heads_with_hidden_sinks": report.fraction_of_heads_with_hidden_sinks,
                   "top_first_token_heads": [[l, h, s] for l, h, s in report.first_token_mass.top(10)],
                   "massive_activations": len(report.massive)}
        run.save_samples(report.hidden_sinks, "hidden_sinks")
        run.save_samples(report.massive, "massive")
        run.save_samples(report.top_activation, "top_activation")
        run.save_per_sample(report.per_sample, [f"text {t}" for t in range(len(texts))])
        run.save_examples([{"text": t, "label": f"text {i}", "spans": {"first": (0, 1)}} for i, t in enumerate(texts)])
        return _finish(run, summary, {"first_token_mass": report.first_token_mass, "hidden_sink_rate": report.hidden_sink_rate})


def score_patterns(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                   random_inputs: int = 16, length: int = 128, exclude_bos: bool = False,
                   exclude_current_token: bool = False, seed: int = 0, progress: bool = True) -> Path:
    """Previous-token, duplicate-token and induction scores (TransformerLens's detect_head) on
    repeated random tokens, and on texts (--data, or a real-text zoo model's held-out corpus)."""
    from headlab.analyses import patterns, sinks

    params = {"data": data, "random_inputs": random_inputs, "length": length, "exclude_bos": exclude_bos,
              "exclude_current_token": exclude_current_token, "seed": seed}
    _check_count(random_inputs, "--random", 0)
    _check_count(length, "--length")
    if data:
        texts = sinks.build_dataset(path=data)
    elif _is_corpus_model(model):
        from headlab.zoo import corpus

        texts = corpus.texts(None, 12, max_tokens=512)
    else:
        texts = []
    if not texts and not random_inputs:
        raise HeadlabError("nothing to score: give --data (a text file, one text per line) or --random N > 0")
    config = patterns.PatternsConfig(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
                                     max_tokens=max(1024, 2 * length + 1))
    with started(out, "patterns", model, params, run_id) as (run, hm):
        cache = Checkpoint(run.dir / CHECKPOINT)
        results, summary = {}, {}
        if random_inputs:
            rnd = patterns.score(hm, patterns.repeated_random_tokens(hm, random_inputs, length, seed), config,
                                 progress=progress, cache=cache, source="random")
            results.update(rnd.scores)
            run.save_per_sample(rnd.per_sample, [f"random {i}" for i in range(random_inputs)])
        if texts:
            txt = patterns.score(hm, patterns.encode_texts(hm, texts, config.max_tokens), config, progress=progress,
                                 cache=cache, source="text")
            results.update({f"{k}_text": v for k, v in txt.scores.items()})
            run.save_examples([{"text": t, "label": f"text {i}"} for i, t in enumerate(texts)])
        for name, scores in results.items():
            summary[name] = [[l, h, s] for l, h, s in scores.top(5)]
        return _finish(run, {"inputs": {"random": random_inputs, "texts": len(texts)}, "top_heads": summary}, results)


def score_probes(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                 n: int = 48, position: int = -1, folds: int = 5, positive: str | None = None, seed: int = 0,
                 progress: bool = True) -> Path:
    """Linear probes on every head's output (ITI): which heads encode a binary label; probe directions saved."""
    from headlab.analyses import probes

    params = {"data": data, "n": n, "position": position, "folds": folds, "positive": positive, "seed": seed}
    _check_count(folds, "--folds", 2)
    if data:
        samples = probes.build_dataset(path=data)
    elif _zoo_task(model, "refusal"):
        from headlab.analyses import safety

        _check_count(n, "--n", 2)
        samples = probes.build_dataset(samples=[(p, "refuse") for p in safety.zoo_dataset(n, True)]
                                       + [(p, "comply") for p in safety.zoo_dataset(n, False)])
        positive = positive or "refuse"
    elif model == "zoo:shapes-llava":  # each question with its image and with the scene emptied
        _check_count(n, "--n", 2)
        samples = probes.image_presence_samples(n, seed)
        positive = positive or "image"
    else:
        raise HeadlabError(f"give --data (JSONL/CSV with text and label columns) for {model}")
    probes.classes(samples, positive)  # two labels, a known positive one: checked before the model loads
    config = probes.ProbeConfig(position=position, folds=folds, positive=positive, seed=seed)
    with started(out, "probes", model, params, run_id) as (run, hm):
        result = probes.score(hm, samples, config, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT))
        run.save_tensors({"directions": result.directions, "sigma": result.sigma, "mass_mean": result.mass_mean},
                         "probe_directions", {"labels": list(result.labels), "position": position})
        run.save_examples([{"text": s.text, "label": s.label, "image": s.image} for s in samples])
        summary = {"inputs": len(samples), "labels": {"negative": result.labels[0], "positive": result.labels[1]},
                   "top_accuracy": [[l, h, s] for l, h, s in result.accuracy.top(10)],
                   "top_log_likelihood": [[l, h, s] for l, h, s in result.log_likelihood.top(10)]}
        return _finish(run, summary, {"probe_accuracy": result.accuracy, "probe_auroc": result.auroc,
                                      "probe_log_likelihood": result.log_likelihood})


def score_select_copy(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                      n: int = 200, labels: str = "letters", key_token: str = "end", shots: int = 0,
                      prompt_format: str | None = None, progress: bool = True) -> Path:
    from headlab.analyses import select_copy as sc

    zoo_model = _is_zoo_task_model(model)
    prompt_format = prompt_format or ("zoo" if zoo_model else "paper")
    if prompt_format not in ("zoo", "paper"):
        raise HeadlabError(f"--format must be 'paper' or 'zoo', got {prompt_format!r}")
    params = {"data": data, "n": n, "labels": labels, "key_token": key_token, "shots": shots, "format": prompt_format}
    if labels not in sc.LABEL_SETS:
        raise HeadlabError(f"--labels must be one of {', '.join(sorted(sc.LABEL_SETS))}, got {labels!r}")
    if key_token not in ("end", "label"):
        raise HeadlabError(f"--key-token must be 'end' (the option's last token) or 'label', got {key_token!r}")
    _check_count(n, "--n", 2)
    _check_count(shots, "--shots", 0)
    if data:
        samples = sc.build_dataset(path=data)
    elif zoo_model:
        samples = sc.zoo_dataset(n, label_set=labels)
    elif _is_corpus_model(model):
        raise HeadlabError(f"select-and-copy heads do not apply to {model}: {NOT_APPLICABLE['select_copy']}; "
                           "give --data (JSONL/CSV of question, options, answer) to score it anyway")
    else:
        raise HeadlabError(f"give --data (JSONL/CSV of question, options, answer) for {model}")
    config = sc.SelectCopyConfig(labels=labels, key_token=key_token, shots=shots,  # type: ignore[arg-type]
                                 format=sc.ZOO_FORMAT if prompt_format == "zoo" else sc.PAPER_FORMAT)
    with started(out, "select_copy", model, params, run_id) as (run, hm):
        result = sc.score(hm, samples, config, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT))
        summary = {**result.test, "top_heads": [[l, h, s] for l, h, s in result.qk_accuracy.top(10)]}
        val = result.samples[result.samples["split"] == "validation"]["sample"].tolist()
        run.save_per_sample({"qk_accuracy": result.per_sample["qk"], "attention_accuracy": result.per_sample["attention"]},
                            [f"question {i}" for i in val])
        run.save_examples([{"text": result.prompts[i], "label": f"question {i}: answer {samples[i].answer}"} for i in val])
        return _finish(run, summary, {"qk_accuracy": result.qk_accuracy, "attention_accuracy": result.attention_accuracy},
                       result.samples)


def _choice_splits(model: str, data: str | None, n: int, calibration_fraction: float, seed: int):
    from headlab.analyses import choice, select_copy

    _check_fraction(calibration_fraction)
    _check_count(n, "--n", 2)
    if data:
        samples = choice.build_dataset(path=data)
    elif _is_zoo_task_model(model):
        samples = choice.zoo_dataset("mcqa", n)
    elif _is_corpus_model(model):
        from headlab.analyses import code_tasks

        samples = code_tasks.bracket_choices(None, n)
    else:
        raise HeadlabError(f"give --data (JSONL/CSV of prompt, choices, answer) for {model}")
    cal, test = select_copy.split(len(samples), calibration_fraction, seed)
    return [samples[i] for i in cal], [samples[i] for i in test]


def intervene_act(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None, n: int = 200,
                  calibration_fraction: float = 0.5, beta: float = 0.4, tau: float = 0.1, layers: list[int] | None = None,
                  seed: int = 0, method: str = "auto", screen: int = 32, progress: bool = True) -> Path:
    from headlab.analyses import act

    _check_method(method, screen, "--screen")
    config = act.ACTConfig(beta=beta, tau=tau, layers=layers)
    params = {"data": data, "n": n, "calibration_fraction": calibration_fraction, "seed": seed, **asdict(config),
              "method": method, "screen": screen}
    cal, test = _choice_splits(model, data, n, calibration_fraction, seed)
    with started(out, "act", model, params, run_id) as (run, hm):
        result = act.search(hm, cal, config, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT), method=method,
                            screen=screen)
        evaluation = act.evaluate(hm, test, result.plan)
        run.save_plan(result.plan)
        summary = {"heads": [list(h) for h in result.heads], "calibration_accuracy_before": result.baseline_accuracy,
                   "calibration_accuracy_after": result.calibrated_accuracy, "test": evaluation,
                   **_search_summary(result.params)}
        scores = {"act_gain": result.gains}
        if result.loss_estimate is not None:
            scores["act_loss_estimate"] = result.loss_estimate
        return _finish(run, summary, scores)


def intervene_zerotuning(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                         n: int = 200, calibration_fraction: float = 0.5, objective: str = "accuracy",
                         layers: list[int] | None = None, seed: int = 0, method: str = "auto", screen: int = 32,
                         progress: bool = True) -> Path:
    from headlab.analyses import zerotuning as zt

    _check_method(method, screen, "--screen")
    config = zt.ZeroTuningConfig(objective=objective, layers=layers)  # type: ignore[arg-type]
    params = {"data": data, "n": n, "calibration_fraction": calibration_fraction, "seed": seed, **asdict(config),
              "method": method, "screen": screen}
    cal, test = _choice_splits(model, data, n, calibration_fraction, seed)
    with started(out, "zerotuning", model, params, run_id) as (run, hm):
        result = zt.calibrate(hm, cal, config, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT), method=method,
                              screen=screen)
        evaluation = zt.evaluate(hm, test, result.plan)
        run.save_plan(result.plan)
        summary = {"heads": [list(h) for h in result.heads], "gamma": result.gamma, "direction": result.direction,
                   "calibration_objective_before": result.baseline, "calibration_objective_after": result.calibrated,
                   "test": evaluation, **_search_summary(result.params)}
        run.save_samples(result.sweep, "gamma_sweep")
        scores = {"gain_up": result.profile_up, "gain_down": result.profile_down}
        scores.update({f"loss_estimate_{side}": est for side, est in result.loss_estimates.items()})
        return _finish(run, summary, scores)


def _zoo_task(model: str, task: str) -> bool:
    """True for a zoo model trained on `task` (its training.json lists the tasks)."""
    if not _is_zoo_task_model(model):
        return False
    from headlab import zoo
    from headlab.zoo import tasks

    args = json.loads((zoo.path(model[4:]) / "training.json").read_text())["args"]
    return task in args.get("tasks", tasks.TASKS)  # models trained before --tasks existed saw every task


def score_safety(model: str, out: str | Path = "runs", run_id: str | None = None, *, harmful: str | None = None,
                 harmless: str | None = None, column: str | None = None, n: int = 48, ablation: str = "attention",
                 epsilon: float = 1e-4, sahara_epsilon: float = 1e-5, max_heads: int = 3, template: str = "{prompt}",
                 keywords: list[str] | None = None, min_chars: int | None = None, max_new_tokens: int = 32,
                 method: str = "auto", verify: int = 32, ray: str | None = None, shards: int = 4, ray_gpus: float = 0,
                 progress: bool = True) -> Path:
    """Ships per query and head, Sahara's safety-head set, and refusal rates before/after ablating it.
    With `ray`, exhaustive Ships runs as `shards` Ray tasks over the heads."""
    from headlab.analyses import safety

    _check_method(method, verify, "--verify")
    _check_ray(ray, shards)
    zoo_model = _zoo_task(model, "refusal")
    if harmful:
        harmful_prompts = safety.build_dataset(path=harmful, column=column)
        harmless_prompts = safety.build_dataset(path=harmless, column=column) if harmless else None
    elif zoo_model:
        harmful_prompts, harmless_prompts = safety.zoo_dataset(n, True), safety.zoo_dataset(n, False)
    elif _is_corpus_model(model):
        raise HeadlabError(f"safety heads do not apply to {model}: {NOT_APPLICABLE['refusal']}; give --harmful to "
                           "score it anyway")
    else:
        raise HeadlabError(f"{model} is not a zoo model trained on the refusal task: give --harmful (JSONL/CSV with a "
                           f"goal/input/prompt column) and optionally --harmless")
    if keywords:
        matcher = safety.RefusalMatcher(tuple(keywords), min_chars=32 if min_chars is None else min_chars)
    elif zoo_model and not harmful:
        matcher = safety.RefusalMatcher(("sorry", "cannot"), min_chars=0 if min_chars is None else min_chars)
    else:
        matcher = safety.RefusalMatcher(min_chars=32 if min_chars is None else min_chars)
    ships_cfg = safety.SafetyConfig(ablation=ablation, epsilon=epsilon, template=template)  # type: ignore[arg-type]
    sahara_cfg = safety.SafetyConfig(ablation=ablation, epsilon=sahara_epsilon, template=template, max_heads=max_heads)  # type: ignore[arg-type]
    params = {"harmful": harmful, "harmless": harmless, "column": column, "n": n, "ablation": ablation, "epsilon": epsilon,
              "sahara_epsilon": sahara_epsilon, "max_heads": max_heads, "template": template,
              "keywords": list(matcher.keywords), "min_chars": matcher.min_chars, "max_new_tokens": max_new_tokens,
              "method": method, "verify": verify}
    with started(out, "safety", model, params, run_id) as (run, hm):
        cache = Checkpoint(run.dir / CHECKPOINT)
        L, H = hm.spec.shape
        if ray is not None and resolve_method(method, L * H) == "exact":
            from headlab.distributed import shard_work

            heads = [(l, h) for l in range(L) for h in range(H)]
            _shard_on_ray(cache, safety.ships_keys(heads), shard_work(safety.ships_shard, model, harmful_prompts, ships_cfg),
                          ray, shards, ray_gpus, progress)
        ships = safety.ships(hm, harmful_prompts, ships_cfg, progress=progress, cache=cache, method=method, verify=verify)
        found = safety.sahara(hm, harmful_prompts, sahara_cfg, progress=progress, cache=cache)
        evaluation = safety.evaluate(hm, harmful_prompts, harmless_prompts, found.heads, ships_cfg, matcher,
                                     max_new_tokens=max_new_tokens)
        run.save_plan(safety.ablation_plan(found.heads, ships_cfg))
        import pandas as pd

        rows = [{"set": name, **g} for name in ("harmful", "harmless") if name in evaluation for g in evaluation[name].pop("generations")]
        run.save_samples(pd.DataFrame(rows), "generations")
        per_query = [{"prompt": p, "top_heads": json.dumps(ships.query_top(i, 5))} for i, p in enumerate(ships.prompts)]
        run.save_samples(pd.DataFrame(per_query), "ships_per_query")
        summary = {"harmful": len(harmful_prompts), "harmless": len(harmless_prompts or []),
                   "top_ships": [[l, h, s] for l, h, s in ships.scores.top(10) if s == s],  # NaN: not verified (atp)
                   "sahara_heads": [list(h) for h in found.heads], "sahara_angles": found.angles, "evaluation": evaluation,
                   "ships_search": _search_summary(ships.scores.params)}
        scores = {"ships": ships.scores, "ships_top_count": ships.top_counts, "dataset_ships": found.steps[0]}
        if ships.estimate is not None:
            scores["ships_estimate"] = ships.estimate
        return _finish(run, summary, scores)


def _conflict_samples(model: str, data: str | None, n: int):
    from headlab.analyses import conflict

    if data:
        return conflict.build_dataset(path=data)
    if _zoo_task(model, "conflict"):
        return conflict.zoo_dataset(n)
    if _is_corpus_model(model):  # the copying task: "context" = the needle's value, "memory" = the corrupted one
        from headlab.analyses import code_tasks

        return code_tasks.copy_pairs(None, n)
    raise HeadlabError(f"{model} is not a zoo model trained on the conflict task: give --data (JSONL/CSV with prompt, "
                       "memory_answer, context_answer, corrupted_prompt)")


def score_conflict(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                   n: int = 64, method: str = "auto", verify: int = 32, progress: bool = True) -> Path:
    """Memory and context heads by path patching each head to the logits (PH3's first step)."""
    from headlab.analyses import conflict

    _check_method(method, verify, "--verify")
    samples = _conflict_samples(model, data, n)
    params = {"data": data, "n": n, "method": method, "verify": verify}
    with started(out, "conflict", model, params, run_id) as (run, hm):
        heads = conflict.find_heads(hm, samples, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT), method=method,
                                    verify=verify)
        summary = {"pairs": len(samples), "clean_logit_difference": heads.clean_ld,
                   "memory_heads": [[l, h, s] for l, h, s in heads.memory.top(5) if s > 0],
                   "context_heads": [[l, h, s] for l, h, s in heads.context.top(5) if s > 0],
                   **_search_summary(heads.effect.params)}
        scores = {"conflict_effect": heads.effect, "memory_heads": heads.memory, "context_heads": heads.context}
        if heads.estimate is not None:
            scores["conflict_effect_estimate"] = heads.estimate
        return _finish(run, summary, scores)


def intervene_ph3(model: str, out: str | Path = "runs", run_id: str | None = None, *, toward: str = "context",
                  data: str | None = None, n: int = 128, k: int | None = None, max_k: int = 8,
                  calibration_fraction: float = 0.5, seed: int = 0, method: str = "auto", verify: int = 32,
                  progress: bool = True) -> Path:
    """PH3: find memory/context heads on a calibration split, prune toward context or memory, evaluate on the rest."""
    from headlab.analyses import conflict, select_copy

    if toward not in ("context", "memory"):
        raise HeadlabError(f"--toward must be 'context' or 'memory', got {toward!r}")
    _check_fraction(calibration_fraction)
    _check_count(max_k, "--max-k")
    _check_method(method, verify, "--verify")
    if k is not None:
        _check_count(k, "--k")
    samples = _conflict_samples(model, data, n)
    cal_idx, test_idx = select_copy.split(len(samples), calibration_fraction, seed)
    cal, test = [samples[i] for i in cal_idx], [samples[i] for i in test_idx]
    params = {"toward": toward, "data": data, "n": n, "k": k, "max_k": max_k,
              "calibration_fraction": calibration_fraction, "seed": seed, "method": method, "verify": verify}
    spec = load_spec(model)
    if (k or max_k) > spec.n_layers * spec.n_heads:
        raise HeadlabError(f"--{'k' if k else 'max-k'} {k or max_k} is more than the model's {spec.n_layers * spec.n_heads} heads")
    with started(out, "ph3", model, params, run_id) as (run, hm):
        heads = conflict.find_heads(hm, cal, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT), method=method,
                                    verify=verify)
        result = conflict.ph3(hm, cal, heads, toward, k=k, max_k=max_k)  # type: ignore[arg-type]
        evaluation = conflict.evaluate(hm, test, result.plan)
        run.save_plan(result.plan)
        import pandas as pd

        run.save_samples(pd.DataFrame(evaluation.pop("answers")), "answers")
        summary = {"toward": toward, "k": result.k, "pruned": [list(h) for h in result.pruned],
                   "k_selection": result.selection, "test": evaluation, **_search_summary(heads.effect.params)}
        return _finish(run, summary, {"memory_heads": heads.memory, "context_heads": heads.context})


def _answers_frame(before: dict, after: dict):
    """One row per question: the plain answer's fields, and the answer under the intervention
    (the evaluations' per-question rows are moved out of them)."""
    import pandas as pd

    return pd.DataFrame([{**{f"before_{c}": v for c, v in b.items()}, "after_generated": a["generated"],
                          "after_correct": a["correct"]} for b, a in zip(before.pop("rows"), after.pop("rows"))])


def _vision_questions(model: str, data: str | None, images: str | None, template: str | None, n: int,
                      kinds: tuple[str, ...], conflict: bool | None = None):
    from headlab.analyses import vision_heads as vh

    if data:
        if not images:
            raise HeadlabError("give --images (the folder of the dataset's images) with --data")
        return vh.pope_dataset(data, images, template or vh.POPE_TEMPLATE)
    if model == "zoo:shapes-llava":
        return vh.zoo_questions(kinds, n, conflict=conflict)
    raise HeadlabError(f"give --data (POPE-format JSONL: image, text, label) and --images for {model}")


def score_vision_heads(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                       images: str | None = None, template: str | None = None, n: int = 24, max_new_tokens: int = 4,
                       progress: bool = True) -> Path:
    """VHD per head (He et al.): head output with vs without the image, per generated token."""
    from headlab.analyses import vision_heads as vh

    questions = _vision_questions(model, data, images, template, n, ("color", "shape", "where"))
    params = {"data": data, "images": images, "template": template, "n": n, "max_new_tokens": max_new_tokens}
    with started(out, "vision_heads", model, params, run_id) as (run, hm):
        samples = [vh.to_sample(hm, q) for q in questions]
        scores, per_sample = vh.score(hm, samples, max_new_tokens, progress=progress, cache=Checkpoint(run.dir / CHECKPOINT))
        run.save_per_sample({"vhd": per_sample}, [f"question {i}" for i in range(len(questions))])
        run.save_examples([{"text": q.prompt, "label": f"question {i}: answer {q.answer!r}", "image": vh.image_array(q.image)}
                           for i, q in enumerate(questions)])
        summary = {"questions": len(questions), "top_heads": [[l, h, s] for l, h, s in scores.top(10)]}
        return _finish(run, summary, {"vhd": scores})


def intervene_vhr(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                  images: str | None = None, template: str | None = None, n: int = 48, alpha: float = 1.5, k: int = 2,
                  max_new_tokens: int = 3, progress: bool = True) -> Path:
    """VHR: answers with and without reinforcing each step's top-k vision-aware heads per layer by alpha."""

    from headlab.analyses import vision_heads as vh

    _check_count(k, "--k")
    _check_count(max_new_tokens, "--max-new-tokens")
    if not alpha > 0:
        raise HeadlabError(f"--alpha must be > 0 (the reinforced heads' output scale; > 1 reinforces), got {alpha}")
    questions = _vision_questions(model, data, images, template, n, ("object", "pope"), conflict=None)
    if model == "zoo:shapes-llava" and not data:
        questions += vh.zoo_questions(("object",), n, seed=71_000, conflict=True)
    params = {"data": data, "images": images, "template": template, "n": n, "alpha": alpha, "k": k,
              "max_new_tokens": max_new_tokens}
    if k > load_spec(model).n_heads:
        raise HeadlabError(f"--k {k} is more than the {load_spec(model).n_heads} heads of a layer (VHR reinforces k heads per layer)")
    with started(out, "vhr", model, params, run_id) as (run, hm):
        cache = Checkpoint(run.dir / CHECKPOINT)
        before = vh.evaluate(hm, questions, None, k, max_new_tokens, progress=progress, cache=cache, tag="before:")
        after = vh.evaluate(hm, questions, alpha, k, max_new_tokens, progress=progress, cache=cache, tag="after:")
        run.save_samples(_answers_frame(before, after), "answers")
        run.save_json({"alpha": alpha, "k": k, "per_step": True}, "vhr_setting")
        return _finish(run, {"questions": len(questions), "before": before, "after": after}, {})


def intervene_var(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
                  images: str | None = None, template: str | None = None, n: int = 24, p: float = 0.6, tau: float = 20.0,
                  rho: float = 0.6, layer: int | None = None, max_new_tokens: int = 3, progress: bool = True) -> Path:
    """VAR: per question, find the visual sink tokens and image-centric heads, redistribute; answers before/after."""

    from headlab.analyses import vision_heads as vh
    from headlab.analyses import visual_sinks

    questions = _vision_questions(model, data, images, template, n, ("color", "where", "object", "pope"))
    _check_fraction(p, "--p")
    if not 0.0 <= rho <= 1.0 or not tau > 0:
        raise HeadlabError(f"--rho must be in [0, 1] and --tau > 0, got rho={rho}, tau={tau}")
    params = {"data": data, "images": images, "template": template, "n": n, "p": p, "tau": tau, "rho": rho,
              "layer": layer, "max_new_tokens": max_new_tokens}
    with started(out, "var", model, params, run_id) as (run, hm):
        found, plans = [], []
        for q in questions:  # two forwards each: recorded for every question, resumed or not
            sinks = visual_sinks.find(hm, vh.to_sample(hm, q), layer=layer, tau=tau, rho=rho)
            found.append({"sinks": sinks.sinks, "image_centric": [list(h) for h in sinks.image_centric],
                          "max_phi_on_image": float(sinks.phi[sinks.image].max())})
            plans.append(sinks.plan(p) if sinks.sinks and sinks.image_centric else None)  # nothing to move: as is
        cache = Checkpoint(run.dir / CHECKPOINT)
        before = vh.evaluate(hm, questions, max_new_tokens=max_new_tokens, progress=progress, cache=cache, tag="before:")
        after = vh.evaluate(hm, questions, max_new_tokens=max_new_tokens, progress=progress, plans=plans,
                            cache=cache, tag="after:")
        run.save_samples(_answers_frame(before, after), "answers")
        with_sinks = sum(bool(f["sinks"]) for f in found)
        summary = {"questions": len(questions), "questions_with_visual_sinks": with_sinks, "before": before, "after": after,
                   "note": None if with_sinks else f"no image token reached phi >= {tau}: VAR changed nothing"}
        run.save_json(found, "visual_sinks")
        return _finish(run, summary, {})
