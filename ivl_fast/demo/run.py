"""`ivl-fast demo`: the paper's tables in miniature, built from nothing on a CPU.

A made-up world (:mod:`ivl_fast.demo.world`): people, each living in a city and liking a colour, written as
"web text" that a family of bases reads, each about more or fewer people: small (64 wide, 2 layers), mid (96, 3),
large (128, 4), continued (the small base continued on the text about everyone: the paper's CodeLlama case) and
other (large's size, another tokenizer). Chat demonstrations select the format "ANSWER: <word>" on one group of
people; evaluation asks about the others, whose facts appear only in the pretraining text.

Rows (paper, Tables 1, 2, 4, Figures 2, 3, 4; :data:`ivl_fast.demo.report.ROWS`): the bases alone; full
fine-tuning of small and large (the ceiling); the value network on its training base and transferred to mid,
large and continued; an L1 sweep; the linear-probe value model; proxy tuning (large + small tuned - small);
across vocabularies through a map. :mod:`ivl_fast.demo.premise` measures the premise (KL between the bases and the
value network's logit size at the format and content positions).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .report import ROW_NAMES, plot, to_markdown
from .stages import Stages
from .world import demonstrations, make_world, pretraining_text

# the value networks: (directory, the bases they are trained on in turn, L1 weight, scheme)
VALUE_NETWORKS = (
    ("value", ("small",), 0.0, "residual"),
    ("value_l1_0.01", ("small",), 0.01, "residual"),
    ("value_l1_0.1", ("small",), 0.1, "residual"),
    ("value_l1_1", ("small",), 1.0, "residual"),
    ("value_cascade", ("small",), 0.0, "cascade"),
    ("value_cascade+", ("small",), 0.0, "cascade+"),
    ("probe", ("small",), 0.0, "probe"),
    ("value_curriculum", ("small", "mid"), 0.0, "residual"),  # Table 2: small, then mid
    ("value_b", ("small_b",), 0.0, "residual"),  # the other tokenizer's own family (Figure 4's comparison)
    ("value_b_l1_1", ("small_b",), 1.0, "residual"),  # Figure 4 again at the training default (L1 1) on both sides
)
# the stages of run_demo in order, with their seconds in a run from scratch on 2 cores (seed 0, commit 7d4710a; the
# progress estimate weighs the stages by them, stages.py)
STAGE_WEIGHTS = [("tokenizers", 1.0)]
STAGE_WEIGHTS += [("pretrain small", 18.0), ("pretrain mid", 36.0), ("pretrain large", 80.0), ("pretrain other", 77.0)]
STAGE_WEIGHTS += [("continue pretraining small", 9.0), ("pretrain small_b", 13.0)]
STAGE_WEIGHTS += [(f"train {name}", 9.0 if name == "value_curriculum" else 5.0) for name, *_ in VALUE_NETWORKS]
STAGE_WEIGHTS += [("finetune large", 6.0), ("finetune small", 2.0), ("vocab map", 1.0), ("evaluate rows", 3.0)]
STAGE_WEIGHTS += [("lm-eval", 55.0), ("premise", 3.0), ("timing", 3.0)]
STAGE_OUTPUTS = ["small", "mid", "large", "other", "continued", "small_b", "large_finetuned", "small_finetuned"]
STAGE_OUTPUTS += [name for name, *_ in VALUE_NETWORKS]
MARKER = "ivl-demo.json"  # a work dir holds it: the demo reuses (never deletes) only what it wrote there
DEMO_FORMAT = 3  # 3: the family world (demo_world) and the rows of issue #18; 2: the other base's SentencePiece-style
# tokenizer; 1: two identical byte-level BPEs


@dataclass
class DemoConfig:
    """``work_dir``: where models and results go (reused by a later run of the same settings); ``quick``: a smaller
    world and fewer steps (a test-sized run); ``seed``: the world, the initial weights and the data order."""

    work_dir: str = "ivl-demo"
    quick: bool = False
    seed: int = 0

    @property
    def n_people(self) -> int:
        return 24 if self.quick else 80

    @property
    def pretrain_steps(self) -> tuple[int, int, int]:  # small, mid, large (the other base: large's)
        return (40, 50, 60) if self.quick else (500, 700, 900)

    @property
    def continue_steps(self) -> int:  # the continued base: the small one, continued on the text about everyone
        return 20 if self.quick else 300

    @property
    def value_steps(self) -> int:
        return 20 if self.quick else 150

    @property
    def eval_people(self) -> int:
        return 8 if self.quick else 40

    @property
    def tokenizer_sizes(self) -> tuple[int, int]:  # byte-level BPE, SentencePiece-style BPE (+ 256 byte tokens)
        # sizes the world's text fills: the byte-level BPE runs out of merges at 489 (quick) / 648 tokens, the
        # SentencePiece-style one at 362 / 604
        return (450, 300) if self.quick else (600, 400)

    def marker(self) -> dict:
        """What a work dir was built with (the cache is valid only for the same settings)."""
        return {"written_by": "ivl-fast demo", "format": DEMO_FORMAT, "quick": self.quick, "seed": self.seed}


def _save_hf(model_hf, tokenizer, out: Path) -> None:
    model_hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "DONE").write_text("ok")


def _new_base(tokenizer, hidden: int, layers: int, seed: int):
    from ..tiny import llama_config

    torch.manual_seed(seed)
    from transformers import LlamaForCausalLM

    cfg = llama_config(
        len(tokenizer),
        hidden=hidden,
        layers=layers,
        heads=max(2, hidden // 32),
        kv_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def _train_lm(hf, batches, steps: int, lr: float, desc: str, seed: int) -> None:
    """Train a transformers Llama through the lean engine (which shares its weights): plain next-token loss."""
    from tqdm.auto import tqdm

    from ..models import from_hf_model

    lean = from_hf_model(hf).train().requires_grad_(True)
    opt = torch.optim.AdamW(lean.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        ids, mask, labels = batches(g)
        logits = lean(ids, attention_mask=mask)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lean.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _text_batches(tokenizer, lines: list[str], seq: int = 64, batch: int = 16):
    """Random windows of the concatenated text: g -> (ids, mask, labels) [batch, seq]."""
    stream = []
    for line in lines:
        stream += tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
    data = torch.tensor(stream)

    def batches(g):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        ids = torch.stack([data[s : s + seq] for s in starts])
        return ids, torch.ones_like(ids), ids

    return batches


def pretrain(tokenizer, lines: list[str], out: Path, *, hidden: int, layers: int, steps: int, seed: int) -> Path:
    if (out / "DONE").is_file():
        return out
    hf = _new_base(tokenizer, hidden, layers, seed)
    _train_lm(hf, _text_batches(tokenizer, lines), steps, 3e-3, f"pretrain {out.name}", seed)
    _save_hf(hf, tokenizer, out)
    return out


def continue_pretraining(base_dir: Path, lines: list[str], out: Path, *, steps: int, seed: int) -> Path:
    """The base of ``base_dir`` pretrained further on ``lines`` (the paper's continued bases, e.g. CodeLlama)."""
    if (out / "DONE").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from ..chat import load_tokenizer

    tok = load_tokenizer(base_dir)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    _train_lm(hf, _text_batches(tok, lines), steps, 1e-3, f"continue {out.name}", seed)
    _save_hf(hf, tok, out)
    return out


def finetune(base_dir: Path, demos_file: Path, out: Path, *, steps: int, seed: int) -> Path:
    """Full supervised fine-tuning of a base on the demonstrations (the ceiling row)."""
    if (out / "DONE").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from ..chat import load_tokenizer
    from ..train.data import build_dataset, collate

    tok = load_tokenizer(base_dir)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ds = build_dataset(tok, demos_file)

    def batches(g):
        idx = torch.randint(0, len(ds.examples), (16,), generator=g).tolist()
        b = collate([ds.examples[i] for i in idx], tok.pad_token_id)
        return b["input_ids"], b["attention_mask"], b["labels"]

    _train_lm(hf, batches, steps, 1e-3, f"finetune {out.name}", seed)
    _save_hf(hf, tok, out)
    return out


def evaluate(dec, world: dict, people: list[str]) -> dict:
    """Greedy answers to the city and colour questions about ``people``: ``{"accuracy", "format_rate",
    "questions", "seconds", "changed_fraction"}``: the share in the format with the right word, the share in the
    format ("ANSWER: <word>"), the number of questions, the seconds of the one batched ``generate`` call, and for a
    row with a value network the share of the answers' tokens at which it changed the base's choice
    (:mod:`ivl_fast.decode.components`; None for a base alone)."""
    from ..chat import as_messages, render_chat

    qs = []
    for p in people:
        f = world["facts"][p]
        qs.append((f"Where does {p} live?", f["city"]))
        qs.append((f"What color does {p} like?", f["color"]))
    tok = dec.tokenizer
    texts = [render_chat(tok, as_messages(q)) for q, _ in qs]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    both = dec.scheme not in ("base", "value_only")  # a row with a value network: what it changed is kept too
    t0 = time.perf_counter()
    out = dec.generate(ids, max_new_tokens=12, texts=texts if dec.cross_vocab else None, return_components=int(both))
    secs = time.perf_counter() - t0
    t = out.prompt_length
    fmt = acc = 0
    for (_, ans), row, n in zip(qs, out.sequences.tolist(), out.num_new_tokens.tolist(), strict=True):
        text = tok.decode(row[t : t + n], skip_special_tokens=True).strip().split("\n")[0].strip()
        ok_fmt = text.startswith("ANSWER: ") and len(text.split()) >= 2
        fmt += ok_fmt
        acc += ok_fmt and text.split()[1].strip(".") == ans
    n = len(qs)
    changed = None  # the share of the answers' tokens where the value network changed the base's choice
    if both:
        changed = int(out.components.changed.sum()) / max(1, int(out.num_new_tokens.sum()))
    return {"accuracy": acc / n, "format_rate": fmt / n, "questions": n, "seconds": secs, "changed_fraction": changed}


def decode_speeds(decs: dict, prompts: list[list[int]], new: int = 32, repeats: int = 7) -> dict[str, list[float]]:
    """New tokens per second of each decoder for a fixed-length greedy batch (EOS off), after a warm-up call;
    ``repeats`` timed calls per decoder, interleaved so that a slow moment of the machine hits both alike."""
    for dec in decs.values():
        dec.generate(prompts[:2], max_new_tokens=2, eos_token_id=[])
    runs: dict[str, list[float]] = {k: [] for k in decs}
    for _ in range(repeats):
        for k, dec in decs.items():
            t0 = time.perf_counter()
            dec.generate(prompts, max_new_tokens=new, eos_token_id=[])
            runs[k].append(len(prompts) * new / (time.perf_counter() - t0))
    return runs


def _log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def prepare_work_dir(cfg: DemoConfig) -> Path:
    """The work dir, created or reused. Reused only if its marker says this demo built it with the same settings;
    any other non-empty directory is refused (nothing in it is touched)."""
    from ..safe_output import UnsafeOutputError, check_output_location

    work = Path(cfg.work_dir)
    check_output_location(work, {}, flag="--work-dir")
    if work.exists() and not work.is_dir():
        raise UnsafeOutputError(f"--work-dir {str(work)!r} is a file, not a directory")
    if work.is_dir() and any(work.iterdir()):
        try:
            have = json.loads((work / MARKER).read_text())
        except (OSError, ValueError):
            have = None
        if not isinstance(have, dict) or have.get("written_by") != "ivl-fast demo":
            raise UnsafeOutputError(
                f"--work-dir {str(work)!r} holds files but no {MARKER}: it is not a work dir of this version of "
                "`ivl-fast demo`; choose another --work-dir (nothing in it was touched)"
            )
        want = cfg.marker()
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(
                f"--work-dir {str(work)!r} holds a demo built with other settings {diff} (was, now); its cache would "
                "give the wrong rows: use another --work-dir"
            )
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text(json.dumps(cfg.marker(), indent=1))
    return work


TOKENIZER_KINDS = {
    "a": "byte-level BPE (Llama 3 style)",
    "b": "SentencePiece-style BPE with byte fallback (Llama 2 style)",
}


def make_tokenizers(cfg: DemoConfig, texts: list[str], work: Path | None = None):
    """(tok_a, tok_b): a byte-level BPE for the small and large bases ("Ġ" marks a space) and a SentencePiece-style
    BPE with byte fallback for the other base ("▁"). Trained once and kept in ``work/tokenizer_{a,b}`` (a cached
    run uses the tokenizers its models were trained with). Raises if they come out alike."""
    from ..chat import load_tokenizer
    from ..tiny import train_sentencepiece_style_on, train_tokenizer_on
    from ..vocab.build import tokenizer_hash

    bpe, sp = cfg.tokenizer_sizes
    dirs = (work / "tokenizer_a", work / "tokenizer_b") if work is not None else None
    if dirs and all((d / "tokenizer.json").is_file() for d in dirs):
        tok_a, tok_b = (load_tokenizer(d) for d in dirs)
    else:
        tok_a = train_tokenizer_on(texts, bpe)
        tok_b = train_sentencepiece_style_on(texts, sp)
        if len(tok_a) != bpe:
            raise ValueError(f"the demo's text fills {len(tok_a)} BPE tokens, not the {bpe} asked for")
        for tok, d in zip((tok_a, tok_b), dirs or (), strict=False):
            tok.save_pretrained(d)
    if tokenizer_hash(tok_a) == tokenizer_hash(tok_b) or len(tok_a) == len(tok_b):
        raise AssertionError("the two demo tokenizers came out alike: the cross-vocabulary row would be a lie")
    return tok_a, tok_b


def run_demo(cfg: DemoConfig) -> dict:
    """Build (or reuse from ``cfg.work_dir``) every model of the table, evaluate its rows and time decoding; writes
    results.json, results.md and results.png to the work dir and returns the results: ``rows`` (one
    :func:`evaluate` dict per row of ``ROW_NAMES``, with its ``name``), ``tokens_per_s`` (medians) and
    ``tokens_per_s_runs``, each row's ``lm_eval`` scores (:func:`ivl_fast.demo.evaluation.lm_eval_rows`), ``world``,
    ``tokenizers`` (both tokenizers and the map) and ``provenance``."""
    from tqdm.auto import tqdm

    from .. import FastIVLDecoder
    from ..provenance import provenance
    from ..train import TrainConfig, train_value_model
    from ..vocab import VocabMap
    from ..vocab.build import tokenizer_hash
    from .evaluation import lm_eval_rows
    from .premise import premise_stats

    t_start = time.perf_counter()
    work = prepare_work_dir(cfg)
    cached = (work / "results.json").is_file()
    stages = Stages(STAGE_WEIGHTS)
    built = [n for n in STAGE_OUTPUTS if (work / n / "DONE").is_file() or (work / n / "ivl.json").is_file()]
    found = f"reusing {len(built)} models an earlier run built" if built else "building from nothing"
    _log(f"work dir {work}: {found}")
    world = make_world(cfg.n_people, cfg.seed)
    all_lines = pretraining_text(world, world["people"], 6, cfg.seed)
    # the small base reads about the demo people and a third of the evaluation people, the mid base two thirds
    ev = world["eval_people"]
    small_people = world["demo_people"] + ev[: max(1, len(ev) // 3)]
    small_lines = pretraining_text(world, small_people, 6, cfg.seed + 1)
    mid_lines = pretraining_text(world, world["demo_people"] + ev[: max(1, 2 * len(ev) // 3)], 6, cfg.seed + 2)
    demos = demonstrations(world)
    demos_file = work / "demos.jsonl"
    demos_file.write_text("".join(json.dumps(d) + "\n" for d in demos))
    # both tokenizers learn from the pretraining text and the rendered chat format, by different algorithms
    rendered = [f"<|user|>\n{d['messages'][0]['content']}\n<|assistant|>\n{d['messages'][1]['content']}" for d in demos]
    stages.begin("tokenizers", reused=(work / "tokenizer_b" / "tokenizer.json").is_file())
    tok_a, tok_b = make_tokenizers(cfg, all_lines + rendered, work)
    s_steps, m_steps, l_steps = cfg.pretrain_steps

    def done(name: str, marker: str = "DONE") -> bool:
        return (work / name / marker).is_file()

    stages.begin("pretrain small", done("small"))
    small = pretrain(tok_a, small_lines, work / "small", hidden=64, layers=2, steps=s_steps, seed=cfg.seed)
    stages.begin("pretrain mid", done("mid"))
    mid = pretrain(tok_a, mid_lines, work / "mid", hidden=96, layers=3, steps=m_steps, seed=cfg.seed + 3)
    stages.begin("pretrain large", done("large"))
    large = pretrain(tok_a, all_lines, work / "large", hidden=128, layers=4, steps=l_steps, seed=cfg.seed + 1)
    stages.begin("pretrain other", done("other"))
    other = pretrain(tok_b, all_lines, work / "other", hidden=128, layers=4, steps=l_steps, seed=cfg.seed + 2)
    stages.begin("continue pretraining small", done("continued"))
    continued = continue_pretraining(small, all_lines, work / "continued", steps=cfg.continue_steps, seed=cfg.seed)
    # the other tokenizer's small base: the family whose own value network the cross-vocabulary row is compared with
    stages.begin("pretrain small_b", done("small_b"))
    small_b = pretrain(tok_b, small_lines, work / "small_b", hidden=64, layers=2, steps=s_steps, seed=cfg.seed + 4)
    base_dirs = {"small": small, "mid": mid, "small_b": small_b}
    values = {}
    for name, bases, l1, scheme in VALUE_NETWORKS:
        out = work / name
        stages.begin(f"train {name}", done(name, "ivl.json"))
        if not (out / "ivl.json").is_file():
            train_value_model(
                TrainConfig(
                    bases=[str(base_dirs[b]) for b in bases],
                    value_init=str(base_dirs[bases[0]]),
                    data=str(demos_file),
                    out=str(out),
                    l1=l1,
                    scheme=scheme,
                    max_steps=cfg.value_steps,
                    batch_tokens=512,
                    lr=1e-3,
                    save_every=0,
                    progress=True,  # a bar for every training
                    overwrite=(out / "run.json").is_file(),  # an interrupted earlier run of this demo
                    seed=cfg.seed,
                )
            )
        values[name] = out
    stages.begin("finetune large", done("large_finetuned"))
    tuned = finetune(large, demos_file, work / "large_finetuned", steps=cfg.value_steps, seed=cfg.seed)
    stages.begin("finetune small", done("small_finetuned"))
    small_tuned = finetune(small, demos_file, work / "small_finetuned", steps=cfg.value_steps, seed=cfg.seed)
    vmap_file = work / "map_other_to_a.safetensors"
    stages.begin("vocab map", vmap_file.is_file())
    if not vmap_file.is_file():
        VocabMap.build(tok_b, tok_a, all_lines).save(vmap_file)

    eval_people = world["eval_people"][: cfg.eval_people]
    stages.begin("evaluate rows")
    _log(f"evaluating {len(ROW_NAMES)} rows on {2 * len(eval_people)} held-out questions each")

    def alone(d):
        return FastIVLDecoder.from_pretrained(d, None, scheme="base")

    def steered(base, value="value", **kw):
        return FastIVLDecoder.from_pretrained(base, values[value], **kw)

    decs = {
        "small": alone(small),
        "mid": alone(mid),
        "large": alone(large),
        "continued": alone(continued),
        "other": alone(other),
        "small_finetuned": alone(small_tuned),
        "large_finetuned": alone(tuned),
        "small+value": steered(small),
        "mid+value": steered(mid),
        "large+value": steered(large),
        "continued+value": steered(continued),
        "large+value_l1=0.01": steered(large, "value_l1_0.01"),
        "large+value_l1=0.1": steered(large, "value_l1_0.1"),
        "large+value_l1=1": steered(large, "value_l1_1"),
        "small+value_cascade": steered(small, "value_cascade"),
        "large+value_cascade": steered(large, "value_cascade"),
        "small+value_cascade+": steered(small, "value_cascade+"),
        "large+value_cascade+": steered(large, "value_cascade+"),
        "large+value_curriculum": steered(large, "value_curriculum"),
        "small+probe": steered(small, "probe"),
        "large+proxy": FastIVLDecoder.from_pretrained(large, small_tuned, terms=[(small, -1.0)]),
        "other_vocab+value": steered(other, vocab_map=vmap_file),
        "other+value_b": steered(other, "value_b"),
        "other_vocab+value_l1=1": steered(other, "value_l1_1", vocab_map=vmap_file),
        "other+value_b_l1=1": steered(other, "value_b_l1_1"),
    }
    cross = decs["other_vocab+value"]
    if not cross.cross_vocab or tokenizer_hash(cross.base_tokenizer) == tokenizer_hash(cross.tokenizer):
        raise AssertionError("the other_vocab+value row does not decode across two different vocabularies")
    rows = []
    for name in tqdm(ROW_NAMES, desc="evaluate", unit="row", leave=False, file=sys.stderr):
        rows.append({"name": name, **evaluate(decs[name], world, eval_people)})
    stages.begin("lm-eval")
    _log("lm-eval: the same questions as a multiple-choice (log-likelihood) task and a generation task")
    scores = lm_eval_rows(decs, world, eval_people, work)
    for row in rows:
        row["lm_eval"] = scores[row["name"]]
    stages.begin("premise")
    _log("the premise: the bases' agreement and the value network's logit size at the format and content positions")
    premise = premise_stats(work, world, eval_people, ["mid", "large", "continued"])
    stages.begin("timing")
    _log("timing decoding (large alone, large+value)")
    tok = decs["large"].tokenizer
    speed_prompts = [tok(f"{p} lives in", add_special_tokens=True)["input_ids"] for p in eval_people[:8]]
    runs = decode_speeds({k: decs[k] for k in ("large", "large+value")}, speed_prompts)
    vmap = VocabMap.load(vmap_file)
    result = {
        # medians of the timed calls, and every call
        "tokens_per_s": {
            "large_alone": statistics.median(runs["large"]),
            "large+value": statistics.median(runs["large+value"]),
        },
        "tokens_per_s_runs": {"large_alone": runs["large"], "large+value": runs["large+value"]},
        "rows": rows,
        "premise": premise,
        "world": {
            "people": cfg.n_people,
            "eval_people": len(eval_people),
            "quick": cfg.quick,
            "seed": cfg.seed,
            "small_base_knows_eval_people": max(1, len(ev) // 3) / len(ev),
            "mid_base_knows_eval_people": max(1, 2 * len(ev) // 3) / len(ev),
        },
        "tokenizers": {
            "a (small, mid, large, continued, value)": {
                "kind": TOKENIZER_KINDS["a"],
                "size": len(tok_a),
                "hash": tokenizer_hash(tok_a),
            },
            "b (other)": {"kind": TOKENIZER_KINDS["b"], "size": len(tok_b), "hash": tokenizer_hash(tok_b)},
            "map": {"shape": list(vmap.shape), "nonzeros": int(vmap.col.numel())},
        },
    }
    flags = (" --quick" if cfg.quick else "") + (f" --seed {cfg.seed}" if cfg.seed else "")
    result["provenance"] = {
        **provenance(f"ivl-fast demo{flags}"),
        "seconds": time.perf_counter() - t_start,
        "from_cache": cached,
    }
    (work / "results.json").write_text(json.dumps(result, indent=2))
    (work / "results.md").write_text(to_markdown(result))
    plot(result, work / "results.png")
    stages.end()
    return result
