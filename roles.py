"""
The roles of a round: the policy that samples, and the reward models (student, teacher) or LLM
judges that score and compare its responses, each with its `.model`, tokenizer and prompt format: a
caller gives text and gets samples or scores. `sample`, `answer` and `..._each` work in blocks of
`block` prompts shared out over torchrun's processes (parallel.py); the other methods, one batch.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch

import data
from checkpoint import load_model
from data import Sample
from generate import generate
from model import CausalLM, add_reward_head
from parallel import gathered, spread
from train_loop import reward_scores


def in_blocks(model, fn, *columns, block=64, desc=None):
    """parallel.spread, model's full weights on every process: where the roles meet torchrun."""
    with gathered(model):
        return spread(fn, *columns, block=block, desc=desc)


def live_only(fn, prompts, items, *more):
    """fn, in one call, on the prompts whose item is not None; None for the others."""
    live = [i for i, x in enumerate(items) if x is not None]
    out = [None] * len(items)
    if live:
        for i, y in zip(live, fn(*([col[i] for i in live] for col in (prompts, items, *more)))):
            out[i] = y
    return out


# ---- The policy ----------------------------------------------------------------------------------

@dataclass
class Policy:
    """The policy with what sampling text needs: its tokenizer, prompt format, stop and pad ids."""
    model: CausalLM
    tok: object    # its tokenizers.Tokenizer
    fmt: str       # its prompt format (data.FORMATS)
    stops: list    # every id that ends a response: the config's, and the format's end of turn
    pad: int

    def encode(self, prompt):
        return data.encode_prompt(self.tok, self.fmt, prompt)

    def sample(self, prompts, seeds, k, sampling, block=64, desc=None):
        """k Samples per prompt (P lists), as sampling (a config.Sampling) says; a seed per prompt,
        so that its samples do not depend on the block or process it lands in."""
        s = sampling
        generate = partial(self.generate, k=k, max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p)
        return in_blocks(self.model, generate, prompts, seeds, block=block, desc=desc)

    def answer(self, prompts, seeds, sampling, block=64, desc=None):
        """Its answers to held-out prompts: (its greedy response, 4 samples) per prompt."""
        def answers(prompts, seeds):
            greedy = self.generate(prompts, None, 1, sampling.max_new_tokens, 0.0, None)
            samples = self.generate(prompts, seeds, 4, sampling.max_new_tokens,
                                    sampling.temperature, sampling.top_p)
            return list(zip([g[0] for g in greedy], samples))
        return in_blocks(self.model, answers, prompts, seeds, block=block, desc=desc)

    def generate(self, prompts, seeds, k, max_new_tokens, temperature=1.0, top_p=None):
        """k responses to each prompt in one batch (seeds None and temperature 0: greedy)."""
        gens = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
        ids = generate(self.model, [self.encode(p) for p in prompts], max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_token_id=self.stops,
                       generator=gens, num_samples=k)
        samples = [Sample(t, *data.response_text(self.tok, t, self.stops)) for t in ids]
        return [samples[i * k:(i + 1) * k] for i in range(len(prompts))]


def load_policy(path, fmt, device=None):
    """A causal LM checkpoint, its tokenizer and prompt format, as a Policy."""
    lm = load_model(path, device)
    if lm.config.reward:
        raise ValueError(f"policy {path} is a reward model ({lm.config.arch}); it must be a "
                         f"causal LM")
    tok = data.load_tokenizer(path)
    data.check_format(tok, fmt)
    end, stops = data.end_id(tok, fmt, lm.config), list(lm.config.stop_token_ids)
    if end not in stops:
        stops.append(end)
    return Policy(lm, tok, fmt, stops, data.pad_id(lm.config))


# ---- Reward models and LLM judges ----------------------------------------------------------------

JUDGE_TEMPLATE = ("Which response to the instruction is better?\n\nInstruction: {prompt}\n\n"
                  "Response A: {a}\n\nResponse B: {b}\n\n"
                  "Answer with the letter of the better response, A or B.")


@dataclass
class Scorer:
    """A reward model (the student, the teacher), or with judge=True a causal LM asked which of two
    responses is better. It gets the text of a response and formats it for its own tokenizer."""
    model: torch.nn.Module  # a model.RewardModel or encoder.EncoderRewardModel; a judge: a CausalLM
    tok: object          # its tokenizers.Tokenizer
    fmt: str             # its prompt format (data.FORMATS); an encoder: "pair" (data.pair_ids)
    eos: int | None      # the token a finished response ends with (an encoder: None)
    pad: int
    judge: bool = False
    min_mass: float = 0.1  # a judge whose two labels get less probability than this gave no answer

    def ids(self, prompt, response, finished):
        """One row, formatted and tokenised for this model."""
        if self.fmt == "pair":  # an encoder: the bare pair, whether or not the response finished
            return data.pair_ids(self.tok, prompt, response, self.model.config.max_positions)
        return data.reward_ids(self.tok, self.fmt, prompt, response, finished, self.eos)

    def score(self, prompts, responses, finished):
        """Reward of each (prompt, response text, finished), (N,) on the CPU."""
        rows = [self.ids(*x) for x in zip(prompts, responses, finished)]
        return reward_scores(self.model, rows, self.pad, groups=prompts)  # a prompt computed once

    def margins(self, prompts, firsts, seconds):
        """How much it prefers each first data.Sample to its second, (N,) on the CPU, in 2 calls: a
        reward model scores both; a judge is asked in both orders (disagreeing: 0; invalid: NaN)."""
        n = len(prompts)
        if not self.judge:
            s = self.score(prompts * 2, [a.text for a in firsts] + [b.text for b in seconds],
                           [a.finished for a in firsts] + [b.finished for b in seconds])
            return s[:n] - s[n:]
        a, b = [x.text for x in firsts], [x.text for x in seconds]
        p1 = self.compare(prompts, a, b)      # P(first better), asked with it first
        p2 = 1 - self.compare(prompts, b, a)  # the same, asked with it second
        margin = (p1 + p2) / 2 - 0.5
        return torch.where((p1 > 0.5) != (p2 > 0.5), torch.zeros_like(margin), margin)  # NaN stays

    def tournament(self, prompt, texts):
        """A judge's scores of n responses to one prompt: each asked against each other in both
        orders (n(n-1) calls), a response's score its share of the wins. -> (scores (n,), calls)."""
        n = len(texts)
        order = [(i, j) for i in range(n) for j in range(n) if i != j]
        p = self.compare([prompt] * len(order), [texts[i] for i, _ in order],
                         [texts[j] for _, j in order])
        wins = torch.zeros(n)
        for (i, j), pi in zip(order, p.tolist()):
            if not math.isnan(pi):  # an invalid answer gives no one the win
                wins[i] += pi
                wins[j] += 1 - pi
        return wins / (2 * (n - 1)), len(order)

    @torch.no_grad()
    def compare(self, prompts, first, second):
        """LLM judge: P(first is better) from the next-token probabilities of the labels A and B,
        (N,) on the CPU; NaN where they get less than min_mass (an invalid answer)."""
        label_ids = [self.tok.encode(x, add_special_tokens=False).ids[0] for x in ("A", "B")]
        rows = [data.encode_prompt(self.tok, self.fmt, JUDGE_TEMPLATE.format(prompt=p, a=a, b=b))
                for p, a, b in zip(prompts, first, second)]
        dev, out = next(self.model.parameters()).device, []
        for s in range(0, len(rows), 16):  # rows of one prompt share their common ids (data.pack)
            part = rows[s:s + 16]
            b = {k: v.to(dev) for k, v in data.pack(part, self.pad, prompts[s:s + 16]).items()}
            last = data.last_index(b, part)
            logits = self.model(b["input_ids"], b["attention_mask"], select=last,
                                branch=b["branch"])                             # (N, V)
            probs = logits.float().softmax(-1).cpu()
            pa, pb = probs[:, label_ids[0]], probs[:, label_ids[1]]
            out.append(torch.where(pa + pb < self.min_mass, torch.full_like(pa, float("nan")),
                                   pa / (pa + pb)))
        return torch.cat(out)

    def scores_each(self, prompts, pools, block=64, batched=True):
        """Per prompt, its pool of data.Samples' scores (n,) on the CPU (None for a None pool): a
        block's pools in one batch (batched) or each apart; a judge by tournament (n(n-1) calls)."""
        def scores(prompts, pools):
            if self.judge:
                return [self.tournament(p, [c.text for c in pool])[0]
                        for p, pool in zip(prompts, pools)]
            if not batched:
                return [self.score([p] * len(c), [x.text for x in c], [x.finished for x in c])
                        for p, c in zip(prompts, pools)]
            flat = [(p, c) for p, pool in zip(prompts, pools) for c in pool]
            s = self.score([p for p, _ in flat], [c.text for _, c in flat],
                           [c.finished for _, c in flat])
            return [x.clone() for x in s.split([len(pool) for pool in pools])]
        return in_blocks(self.model, partial(live_only, scores), prompts, pools, block=block)

    def margins_each(self, prompts, firsts, seconds, block=64):
        """Per prompt, how much it prefers its first data.Sample over its second (a float; margins),
        or None where its first is None; each block's pairs in one batch."""
        margins = partial(live_only, lambda *pairs: self.margins(*pairs).tolist())
        return in_blocks(self.model, margins, prompts, firsts, seconds, block=block)


def load_scorer(path, fmt, device=None, judge=False, min_mass=0.1, reward_head=False):
    """A checkpoint with its tokenizer and prompt format as a Scorer: a reward model, or (judge) a
    causal LM; with reward_head a causal LM gets a fresh scalar head (a student to train)."""
    m = load_model(path, device)
    if judge and m.config.reward:
        raise ValueError(f"{path} is a reward model; an LLM judge must be a causal LM")
    if not judge and not m.config.reward:
        if not reward_head:
            raise ValueError(f"{path} is a causal LM, not a reward model "
                             f"(use --teacher-judge for an LLM judge)")
        m = add_reward_head(m)
    tok = data.load_tokenizer(path)
    if m.config.encoder:  # it reads the pair encoding ("pair"): no prompt format, no stop token
        post = tok.post_processor
        if post is None or post.num_special_tokens_to_add(True) == 0:
            raise ValueError(f"tokenizer.json in {path} has no post-processor that builds pairs; "
                             f"an encoder reward model reads its tokenizer's pair encoding, e.g. "
                             f"[CLS] prompt [SEP] response [SEP]")
        tok.no_truncation()  # data.pair_ids truncates, by its own rule; data.pad pads
        tok.no_padding()
        return Scorer(m, tok, "pair", None, data.pad_id(m.config), judge, min_mass)
    data.check_format(tok, fmt)
    return Scorer(m, tok, fmt, data.end_id(tok, fmt, m.config), data.pad_id(m.config), judge,
                  min_mass)
