"""Train `zoo:pycode-llama`: a small Llama on real Python source, whose heads emerge from data.

One command on the GPU machine (seeded; nothing to download — the corpus is the `.py` source
that the machine's own interpreter holds: its standard library and installed packages):

    python studies/zoo/train_text.py --out /tmp/pycode --minutes 6.5

Steps:
1. Corpus: every `.py` file under the interpreter's stdlib / purelib / platlib paths, 200 B–1 MB,
   UTF-8, deduplicated by content (sha256). Split by file: a file goes to validation when a
   seeded hash of its content falls in the lowest `--val-percent`. The interpreter version, the
   package versions, the file list (path, sha256, split) and a corpus hash are recorded.
2. Tokenizer: byte-level BPE (`tokenizers`) trained on (a seeded sample of) the train split;
   `<|endoftext|>` separates documents and is prepended as BOS by the saved tokenizer.
3. Model: `LlamaForCausalLM`, GQA (8 query / 2 key-value heads), trained on random 1024-token
   windows of the concatenated train split, AdamW + warmup + cosine, bf16 autocast. The number
   of steps is fixed from the throughput of the first steps and the time budget (recorded:
   `--steps N` reruns exactly that schedule). Loss every `--log-every` steps and validation
   loss every `--eval-every` steps go to `training.json`.
4. Baseline: an add-α smoothed bigram model on the same train tokens, evaluated on the same
   validation windows (α chosen on validation: the baseline's best case).
5. Saved: fp16 safetensors, tokenizer, `training.json`, `corpus.json` (+ `files.jsonl.gz`) and
   `heldout.jsonl.gz` — validation files from the standard library only (PSF-licensed), for
   the card, the tests and the demo, which run where this interpreter's corpus is absent.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

EOT = "<|endoftext|>"


def corpus_roots() -> dict[str, str]:
    paths = sysconfig.get_paths()
    roots = {}
    for key in ("stdlib", "purelib", "platlib"):
        p = os.path.realpath(paths[key])
        if os.path.isdir(p) and p not in roots.values():
            roots[key] = p
    return roots


def read_corpus(roots: dict[str, str], min_bytes: int, max_bytes: int, max_files: int | None) -> list[dict]:
    """Deduplicated .py files: dicts with root, path (relative), sha256, text."""
    seen: dict[str, dict] = {}
    for root_name, root in roots.items():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if root_name == "stdlib":  # the packages are read from their own roots
                dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    raw = open(full, "rb").read()
                except OSError:
                    continue
                if not min_bytes <= len(raw) <= max_bytes:
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                digest = hashlib.sha256(raw).hexdigest()
                if digest not in seen:
                    seen[digest] = {"root": root_name, "path": os.path.relpath(full, root), "sha256": digest, "text": text}
                if max_files and len(seen) >= max_files:
                    return list(seen.values())
    return list(seen.values())


def split_of(digest: str, seed: int, val_percent: float) -> str:
    h = int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:8], 16)
    return "validation" if h % 10_000 < val_percent * 100 else "train"


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                       special_tokens=[(EOT, tok.token_to_id(EOT))])
    return tok


def encode(tok, texts: list[str], eot: int) -> np.ndarray:
    """One uint16 stream: EOT + tokens of each document."""
    out = []
    for i in range(0, len(texts), 4096):
        for enc in tok.encode_batch(texts[i : i + 4096], add_special_tokens=False):
            out.append(np.asarray([eot] + enc.ids, dtype=np.uint16))
    return np.concatenate(out)


def bigram_baseline(train: torch.Tensor, targets_prev: torch.Tensor, targets_next: torch.Tensor, vocab: int) -> dict:
    """Add-α bigram with a unigram prior: p(n | p) = (c(p, n) + α V u(n)) / (c(p) + α V)."""
    pairs = torch.bincount(train[:-1].long() * vocab + train[1:].long(), minlength=vocab * vocab).view(vocab, vocab).float()
    row = pairs.sum(1)
    uni = (torch.bincount(train.long(), minlength=vocab).float() + 1) / (train.numel() + vocab)
    results = {}
    for alpha in (0.001, 0.01, 0.1, 1.0):
        p = (pairs[targets_prev, targets_next] + alpha * vocab * uni[targets_next]) / (row[targets_prev] + alpha * vocab)
        results[alpha] = float(-p.log().mean())
    best = min(results, key=results.get)
    return {"alpha": best, "loss": results[best], "perplexity": math.exp(results[best]), "by_alpha": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: from --minutes and the measured speed)")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time budget when --steps is not given")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-percent", type=float, default=2.0)
    ap.add_argument("--tokenizer-mb", type=float, default=60.0, help="train text sampled for the BPE")
    ap.add_argument("--max-files", type=int, default=None, help="corpus cap (dry runs)")
    ap.add_argument("--heldout-kb", type=int, default=600, help="stdlib validation text shipped with the model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log = lambda *a: print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)  # noqa: E731

    # ---- corpus ---------------------------------------------------------------------------------
    roots = corpus_roots()
    files = read_corpus(roots, 200, 1_000_000, args.max_files)
    for f in files:
        f["split"] = split_of(f["sha256"], args.seed, args.val_percent)
    files.sort(key=lambda f: (f["root"], f["path"]))
    train_files = [f for f in files if f["split"] == "train"]
    val_files = [f for f in files if f["split"] == "validation"]
    corpus_hash = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    log(f"corpus: {len(files)} files ({len(train_files)} train / {len(val_files)} validation), "
        f"{sum(len(f['text']) for f in files) / 1e6:.1f} M chars, hash {corpus_hash[:12]}")

    # ---- tokenizer ------------------------------------------------------------------------------
    rng = random.Random(args.seed)
    sample, tok_chars = [], 0
    for f in rng.sample(train_files, len(train_files)):
        if tok_chars > args.tokenizer_mb * 1e6:
            break
        sample.append(f["text"])
        tok_chars += len(f["text"])
    tok = train_tokenizer(sample, args.vocab)
    eot = tok.token_to_id(EOT)
    log(f"tokenizer: {tok.get_vocab_size()} tokens trained on {tok_chars / 1e6:.1f} M chars")
    train_ids = encode(tok, [f["text"] for f in train_files], eot)
    val_ids = encode(tok, [f["text"] for f in val_files], eot)
    log(f"tokens: {train_ids.size / 1e6:.1f} M train, {val_ids.size / 1e6:.2f} M validation")

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                     model_max_length=2 * args.context)
    hf_tok.save_pretrained(out)

    # ---- model ----------------------------------------------------------------------------------
    dev = torch.device(args.device)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.hidden // args.heads, max_position_embeddings=2 * args.context, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model = LlamaForCausalLM(config).to(dev)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    train_t = torch.from_numpy(train_ids.astype(np.int32)).to(dev)
    val_t = torch.from_numpy(val_ids.astype(np.int32)).to(dev)
    T = args.context
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    val_gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    n_val_windows = min(256, max(1, (val_t.numel() - T - 1) // T))
    val_starts = torch.randint(0, val_t.numel() - T - 1, (n_val_windows,), generator=val_gen, device=dev)
    val_windows = torch.stack([val_t[s : s + T + 1] for s in val_starts.tolist()]).long()

    def batch() -> torch.Tensor:
        starts = torch.randint(0, train_t.numel() - T - 1, (args.batch,), generator=gen, device=dev)
        return train_t[starts[:, None] + torch.arange(T + 1, device=dev)].long()

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        total = 0.0
        for i in range(0, val_windows.shape[0], 32):
            w = val_windows[i : i + 32]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(w[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        model.train()
        return total / (val_windows.shape[0] * T)

    def lr_at(step: int, total: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    history, evals = [], []
    total_steps = args.steps
    step, t_train = 0, time.time()
    model.train()
    while total_steps is None or step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps or 10**9)
        x = batch()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if total_steps is None and step in (20, 80):  # fix the schedule from the speed after warm-up (steps 20-80)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step == 20:
                t_measure = time.time()
            else:
                per_step = (time.time() - t_measure) / 60
                total_steps = max(step + 1, int((args.minutes * 60 - (time.time() - t_train)) / per_step) + step)
                log(f"{per_step * 1000:.1f} ms/step -> {total_steps} steps in {args.minutes} min")
        if step % args.log_every == 0 or step == 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step - 1, total_steps or 10**9),
                            "seconds": round(time.time() - t_train, 1)})
        if step % args.eval_every == 0 or step == total_steps:
            v = val_loss()
            evals.append({"step": step, "val_loss": round(v, 4), "tokens": step * args.batch * T})
            log(f"step {step}/{total_steps} loss {loss.item():.3f} val {v:.3f}")
    train_seconds = time.time() - t_train

    # ---- baseline + a copy check ----------------------------------------------------------------
    final_val = evals[-1]["val_loss"]
    bigram = bigram_baseline(train_t, val_windows[:, :-1].flatten(), val_windows[:, 1:].flatten(), config.vocab_size)
    log(f"validation loss {final_val:.3f} (ppl {math.exp(final_val):.2f}); bigram {bigram['loss']:.3f} "
        f"(ppl {bigram['perplexity']:.2f})")
    model.eval()
    with torch.no_grad():
        rnd = torch.randint(1, config.vocab_size, (16, 200), generator=torch.Generator(device=dev).manual_seed(7), device=dev)
        rep = torch.cat([torch.full((16, 1), eot, device=dev), rnd, rnd], dim=1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            lg = model(rep).logits.float()
        ce = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), rep[:, 1:], reduction="none")
        repeat = {"first_copy_loss": float(ce[:, :200].mean()), "second_copy_loss": float(ce[:, 201:].mean())}
    log(f"repeated random tokens: loss {repeat['first_copy_loss']:.2f} first copy, {repeat['second_copy_loss']:.2f} second")

    # ---- save -----------------------------------------------------------------------------------
    model.half().save_pretrained(out, max_shard_size="15MB")  # the GPU tool returns files of <= 16 MiB
    versions = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    with gzip.open(out / "files.jsonl.gz", "wt", encoding="utf-8") as fh:
        for f in files:
            fh.write(json.dumps({"root": f["root"], "path": f["path"], "sha256": f["sha256"], "split": f["split"]}) + "\n")
    heldout, size = [], 0
    for f in sorted((f for f in val_files if f["root"] == "stdlib" and 3_000 <= len(f["text"]) <= 60_000),
                    key=lambda f: f["sha256"]):
        if size > args.heldout_kb * 1000:
            break
        heldout.append({"path": f["path"], "sha256": f["sha256"], "text": f["text"]})
        size += len(f["text"])
    with gzip.open(out / "heldout.jsonl.gz", "wt", encoding="utf-8") as fh:
        for h in heldout:
            fh.write(json.dumps(h) + "\n")
    corpus = {"roots": roots, "files": len(files), "train_files": len(train_files), "validation_files": len(val_files),
              "chars": sum(len(f["text"]) for f in files), "train_tokens": int(train_ids.size),
              "validation_tokens": int(val_ids.size), "hash": corpus_hash, "tokenizer_sample_chars": tok_chars,
              "filters": "*.py, 200 B to 1 MB, UTF-8, deduplicated by sha256", "val_percent": args.val_percent,
              "heldout_files": len(heldout), "file_list": "files.jsonl.gz"}
    (out / "corpus.json").write_text(json.dumps(corpus, indent=2) + "\n")
    record = {
        "model": "pycode-llama", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "args": vars(args), "seed": args.seed,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "python": sys.version.split()[0], "interpreter": sys.executable,
        "versions": {k: versions.get(k) for k in ("torch", "transformers", "tokenizers", "numpy", "triton")},
        "installed_packages": dict(sorted(versions.items())),
        "parameters": n_params, "steps": step, "tokens_seen": step * args.batch * T, "train_seconds": round(train_seconds, 1),
        "validation": {"loss": final_val, "perplexity": math.exp(final_val), "windows": int(val_windows.shape[0]),
                       "tokens": int(val_windows.shape[0] * T)},
        "bigram_baseline": bigram, "repeated_random_tokens": repeat, "corpus": corpus, "log": history, "evals": evals,
        "wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved to {out}")


if __name__ == "__main__":
    main()
