"""
The run's config: the command line of `tsalign.py` is built from RunConfig's fields, each with its
default and help; a default of None comes from a preset, the default world's or the real
checkpoints'. The run saves it as config.json, keyed by these fields. RoundConfig: a round's part.
"""
import argparse
import os
import sys
from dataclasses import dataclass, field, fields

import data
import world
from checkpoint import is_encoder
from train_loop import TrainConfig


def opt(default, help, **argparse_options):
    """A field of RunConfig: its default, its --help line, and any other argparse options."""
    return field(default=default, metadata=dict(help=help, **argparse_options))


def flag(help):
    """An option that takes no value: off unless given."""
    return opt(False, help)


def preset(help):
    """An option whose default comes from the preset (WORLD or CHECKPOINTS, below)."""
    return opt(None, help)


SELECTIONS = ("ts-align", "teacher-all", "student-only")


@dataclass
class RunConfig:
    """The run's options: each field is the option --NAME (underscores as dashes)."""
    # the rounds, and how each samples and mines pairs
    rounds: int = opt(3, "number of TS-Align rounds (a larger value with --resume extends a run)")
    k: int = opt(8, "responses sampled per prompt (at least 2)")
    prompts_per_round: int = preset("prompts per round (default: 1024 in the world, 256 otherwise)")
    max_new_tokens: int = preset("longest response; longer ones are truncated and not ranked")
    temperature: float = opt(1.0, "sampling temperature of the K responses")
    top_p: float = opt(None, "nucleus sampling threshold of the K responses (default: off)")
    selection: str = opt("ts-align", "how pairs are mined: ts-align, teacher-all or student-only",
                                     choices=SELECTIONS)
    min_margin: float = preset("drop pairs whose teacher margin is below this (ties included)")
    # DPO, and the length penalties
    beta: float = preset("DPO beta (default: the world's own, 0.1 for real checkpoints)")
    loss_type: str = opt("sigmoid", "DPO loss: sigmoid (Rafailov 2023) or ipo (Azar 2023)",
                                    choices=("sigmoid", "ipo"))
    label_smoothing: float = opt(0.0, "conservative DPO label smoothing in [0, 0.5)")
    average_logprobs: bool = flag("average response log-probs per token (as IPO's authors do) "
                                  "instead of summing")
    sft_coef: float = opt(0.0, "weight of an extra SFT term on the chosen responses")
    rdpo_alpha: float = opt(0.0, "R-DPO (Park et al. 2024): alpha of the length term alpha (|y_w| "
                                 "- |y_l|) inside DPO's sigmoid (0: off)")
    length_penalty: float = opt(0.0, "subtract this x the response's token count from the "
                                     "teacher's scores before the pair is ordered (0: off)")
    student_length_penalty: float = preset("subtract this x the response's token count from the "
                                           "student's scores before it picks best and worst "
                                           "(default: 0.5 in the world, 0 otherwise)")
    # training the policy and the student
    reference: str = opt("round-start", "DPO reference: the round-start policy or the original SFT "
                                        "policy", choices=("round-start", "sft"))
    lr: float = preset("policy learning rate")
    epochs: int = preset("DPO epochs over each round's pairs")
    batch_size: int = preset("pairs per training batch (policy and student)")
    student_lr: float = preset("student learning rate")
    student_epochs: int = preset("student epochs over all teacher pairs so far")
    student_margin: float = opt(0.0, "margin m of the student's ranking loss -log sigmoid(r_c - "
                                     "r_r - m)")
    lora_rank: int = opt(0, "LoRA rank for the policy (0 = full fine-tuning)")
    student_lora_rank: int = opt(0, "LoRA rank for the student (0 = full fine-tuning)")
    student_warmup: int = opt(0, "before round 1, the teacher labels this many base-policy pairs "
                                 "to train the student")
    eval_count: int = preset("held-out prompts to evaluate on (default: 2000 in the world, 64 "
                             "otherwise)")
    # the run: its processes, checkpoints, seed, folder and device
    sample_batch: int = opt(64, "prompts sampled in one batch (also the unit of work split between "
                                "torchrun processes)")
    fsdp: bool = flag("under torchrun: shard the policy and the student across the processes "
                      "(FSDP2)")
    max_shard_size: float = opt(5.0, "saved checkpoints: GB per weight file before it is split "
                                     "into shards")
    seed: int = opt(0, "seed of every random choice (prompts, samples, shuffles), per round")
    out: str = opt(None, "run folder (default: a new dated folder under runs/)")
    resume: bool = flag("continue the run in --out (default: the newest under runs/) after its "
                        "last finished round")
    rebuild_world: bool = flag("build the default world anew (into ~/.cache/tsalign/world) instead "
                               "of using the shipped one")
    device: str = opt(None, "cpu or cuda (default: cuda when available)")
    # the models and the prompts (with --policy: real checkpoints; without, the default world)
    policy: str = opt(None, "policy checkpoint folder (Hugging Face format); none: the embedded "
                            "default world")
    student: str = opt(None, "student checkpoint: a reward model, or a causal LM that gets a fresh "
                             "scalar head")
    teacher: str = opt(None, "teacher checkpoint: a reward model (or a causal LM with "
                             "--teacher-judge)")
    teacher_judge: bool = flag("use the teacher as an LLM judge that compares two responses")
    judge: str = opt(None, "independent evaluator checkpoint for the win rate (reward model or LLM "
                           "judge)")
    judge_min_mass: float = opt(0.1, "an LLM judge whose two labels get less probability than this "
                                     "gave an invalid answer")
    prompts: str = opt(None, "training prompts, .jsonl ({\"prompt\": ...} per line) or .txt (one "
                             "per line)")
    eval_prompts: str = opt(None, "held-out prompts (default: a fixed, seeded share of --prompts)")
    prompt_format: str = opt(None, f"policy prompt format: {', '.join(data.FORMATS)}")
    student_format: str = opt(None, "student prompt format (default: --prompt-format)")
    teacher_format: str = opt(None, "teacher prompt format (default: --prompt-format)")
    # no training: --report draws finished runs
    report: list = opt(None, "no training: draw these run folders on the same axes into --output",
                             nargs="+", metavar="RUN")
    output: str = opt("compare.html", "with --report: the page to write, or a .svg of the main "
                                      "charts", flags=("-o",))

# The presets, what a default of None becomes: the default world's (measured on it; world.py says
# why each) and the real checkpoints' (with --policy).
WORLD = dict(beta=4.0, prompts_per_round=1024, eval_count=2000, min_margin=2.5,
             max_new_tokens=world.MAX_NEW_TOKENS, lr=1e-4, epochs=2, batch_size=64,
             student_lr=5e-4, student_epochs=2, student_length_penalty=0.5)
CHECKPOINTS = dict(beta=0.1, prompts_per_round=256, eval_count=64, min_margin=0.0,
                   max_new_tokens=256, lr=5e-7, epochs=1, batch_size=8, student_lr=1e-5,
                   student_epochs=1, student_length_penalty=0.0)


def build_parser():
    p = argparse.ArgumentParser(description="TS-Align: iterative DPO with a student that searches "
                                            "and a teacher that decides.")
    for f in fields(RunConfig):
        kw = {k: v for k, v in f.metadata.items() if k != "flags"}
        if f.type is bool:
            kw["action"] = "store_true"
        elif f.type in (int, float):
            kw["type"] = f.type
        flags = (*f.metadata.get("flags", ()), "--" + f.name.replace("_", "-"))
        p.add_argument(*flags, default=f.default, **kw)
    return p


def parse_args(argv):
    """The options as a RunConfig (preset defaults in, all checked), and those given explicitly."""
    parser = build_parser()
    args = RunConfig(**vars(parser.parse_args(argv)))
    explicit = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    if args.report:
        return args, explicit
    for k, v in (WORLD if args.policy is None else CHECKPOINTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check(args)
    return args, explicit


def fail(msg):
    """A user's mistake: one line on stderr, exit status 2."""
    print(f"tsalign: error: {msg}", file=sys.stderr)
    sys.exit(2)


def check(args):
    """fail() on the first option out of range or missing; fill in the scorers' prompt formats."""
    dash = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    least = {"rounds": 1, "k": 2, **dict.fromkeys(("prompts_per_round", "max_new_tokens", "epochs",
                                                   "batch_size", "student_epochs", "eval_count",
                                                   "sample_batch"), 1)}
    for name, low in least.items():
        if getattr(args, name) < low:
            fail(f"{dash(name)} must be at least {low}, got {getattr(args, name)}")
    for name in ("beta", "lr", "student_lr", "temperature", "max_shard_size"):
        if getattr(args, name) <= 0:
            fail(f"{dash(name)} must be positive, got {getattr(args, name)}")
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        fail("--fsdp shards the models across torchrun's processes: start the run with torchrun "
             "(torchrun --standalone --nproc_per_node N tsalign.py ... --fsdp)")
    if args.fsdp and (args.lora_rank or args.student_lora_rank or args.reference == "sft"):
        fail("--fsdp does not take --lora-rank, --student-lora-rank or --reference sft: adapters "
             "are added and merged every round, which a sharded model cannot take, and the sft "
             "reference would be a full copy per process")
    if not 0 <= args.label_smoothing < 0.5 or args.min_margin < 0 or args.student_margin < 0:
        fail("need 0 <= --label-smoothing < 0.5, --min-margin >= 0 and --student-margin >= 0")
    for name in ("rdpo_alpha", "length_penalty", "student_length_penalty"):
        if getattr(args, name) < 0:
            fail(f"{dash(name)} must be >= 0, got {getattr(args, name)}")
    if args.rdpo_alpha > 0 and args.loss_type != "sigmoid":
        fail("--rdpo-alpha is a term of the sigmoid DPO loss; it does not apply to --loss-type ipo")
    if args.length_penalty > 0 and args.teacher_judge:
        fail("--length-penalty subtracts from the teacher's scores, and an LLM judge "
             "(--teacher-judge) gives none")
    missing = [n for n in ("student", "teacher", "prompts", "prompt_format")
               if getattr(args, n) is None]
    if args.policy is not None and missing:
        fail(f"with --policy, also give {', '.join(map(dash, missing))}")
    if args.policy is not None and args.rebuild_world:
        fail("--rebuild-world is for the default world; with --policy there is no world to build")
    if args.policy is None:  # the default world draws its own prompts and is judged by its oracle
        given = [n for n in ("prompts", "eval_prompts", "judge", "teacher_judge")
                 if getattr(args, n)]
        given += [n for n in ("prompt_format", "student_format", "teacher_format")
                  if getattr(args, n) not in (None, world.FORMAT)]
        if given:
            fail(f"{', '.join(map(dash, given))}: for real checkpoints (with --policy); the "
                 f"default world has its own prompts, format ({world.FORMAT}) and oracle")
        args.prompt_format = world.FORMAT
    for name in ("prompt_format", "student_format", "teacher_format"):
        if getattr(args, name) not in (None, *data.FORMATS):
            fail(f"unknown prompt format {getattr(args, name)!r} for {dash(name)}; "
                 f"known: {', '.join(data.FORMATS)}")
    if args.student and is_encoder(args.student):  # it reads the bare (prompt, response) pair
        if args.student_format:
            fail(f"--student-format: the student {args.student} is an encoder reward model, which "
                 f"reads its tokenizer's pair encoding of (prompt, response), not a prompt format; "
                 f"leave the option out")
        args.student_format = "pair"
    args.student_format = args.student_format or args.prompt_format
    args.teacher_format = args.teacher_format or args.prompt_format


# ---- What a round reads of the run's config ------------------------------------------------------

@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float | None  # nucleus sampling (None: off)


@dataclass
class DPO:
    """train_loop.train_dpo's options."""
    beta: float
    loss_type: str          # sigmoid (Rafailov 2023) or ipo (Azar 2023)
    label_smoothing: float  # conservative DPO
    sft_coef: float         # weight of an SFT term on the chosen responses
    average: bool           # average log-probs per token instead of summing
    rdpo_alpha: float       # R-DPO's length term


@dataclass
class RoundConfig:
    """What a round depends on besides the models and the prompts."""
    k: int                  # responses sampled per prompt
    sampling: Sampling      # how those are sampled
    selection: str          # ts-align | teacher-all | student-only
    min_margin: float       # pairs whose decider's margin is below this are dropped
    sample_batch: int       # prompts per sampling batch, and per block of work under torchrun
    student_train: TrainConfig
    policy_train: TrainConfig
    dpo: DPO
    lora_rank: int = 0
    student_lora_rank: int = 0
    student_margin: float = 0.0
    reference_dir: str | None = None     # --reference sft: the original policy, every round's
    length_penalty: float = 0.0          # subtracted per response token from the teacher's scores
    student_length_penalty: float = 0.0  # the same for the student's (in its own units)
    seed: int = 0


def round_config(args, base_dir):
    """The RoundConfig of a RunConfig; base_dir: the original policy's checkpoint."""
    return RoundConfig(
        k=args.k, sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p),
        selection=args.selection, min_margin=args.min_margin, sample_batch=args.sample_batch,
        student_train=TrainConfig(lr=args.student_lr, epochs=args.student_epochs,
                                  batch_size=args.batch_size),
        policy_train=TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size),
        dpo=DPO(args.beta, args.loss_type, args.label_smoothing, args.sft_coef,
                args.average_logprobs, args.rdpo_alpha),
        lora_rank=args.lora_rank, student_lora_rank=args.student_lora_rank,
        student_margin=args.student_margin,
        reference_dir=base_dir if args.reference == "sft" else None,
        length_penalty=args.length_penalty, student_length_penalty=args.student_length_penalty,
        seed=args.seed)
