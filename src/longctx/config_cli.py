"""`longctx config show`: every config key with its type, default and help, generated from the
declarations in ``longctx.train.config`` (the model keys from ``LongctxConfig``'s signature), so the
documentation cannot drift from what is checked. With ``--config FILE`` and/or ``KEY=VALUE`` overrides it
prints the resolved config instead (YAML), checked as `longctx pretrain` would check it. A comparison config
(a file with ``variants:``, read by `longctx compare`) is listed key by key instead: the base keys with the
values the comparison gives them (and which of them the variants change), the comparison's own keys (seeds,
reference, jobs, each finetuning task's seeds, lr grid, data, train and ``task.*`` options, analysis,
extrapolation, compute), every one under the name a ``KEY=VALUE`` override of `longctx compare` uses.
"""
from __future__ import annotations

import copy
import json

from longctx.errors import LongctxError

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def register(sub) -> None:
    p = sub.add_parser("config", help="the config keys: types, defaults and help",
                       description="Show the experiment config keys, or a resolved config.")
    csub = p.add_subparsers(dest="config_kind", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    s = csub.add_parser("show", help="every key with its type, default and help; or a resolved config",
                        description="Without arguments: every config key (dotted), its type, default and help. "
                                    "With --config FILE and/or KEY=VALUE overrides: the resolved config as YAML.")
    s.add_argument("--config", help="a YAML config to resolve and print")
    s.add_argument("--markdown", action="store_true", help="print the key table as Markdown")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides to resolve and print")
    s.set_defaults(func=run_show)


def key_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every declared key."""
    from longctx.train.config import all_keys, describe_limits, type_name

    rows = []
    for k in all_keys():
        kind = type_name(k.annotation)
        limits = describe_limits(k)
        if limits:
            kind += f" ({limits})"
        default = "required" if k.required else json.dumps(k.default)
        rows.append((k.path, kind, default, k.help))
    return rows


# the comparison's own keys (longctx.experiments.compare, downstream, compute; eval.analysis, extrapolation):
# (type, help)
COMPARISON_KEYS = {
    "name": ("str", "the comparison's name: its runs and report go to runs/<name>/"),
    "seeds": ("int | list[int]", "pretraining seeds: K (base.seed, base.seed + 1, ...) or a list; every variant is "
                                 "pretrained once per seed, and every pretrained model finetuned"),
    "reference": ("str", "the variant every other one is compared to (paired differences)"),
    "jobs": ("int (>= 1)", "runs at once, each with cores // jobs threads"),
}
FINETUNE_KEYS = {
    "seeds": ("int (>= 1)", "finetuning runs of each pretrained model"),
    "lr": ("list[float] | null", "the learning-rate grid, chosen per variant on dev (null: train.lr)"),
    "grid_seeds": ("int (>= 1) | null", "the grid runs on the first G pretraining seeds, the chosen point on the others "
                                        "(null: every seed runs the grid)"),
}
ANALYSIS_KEYS = {
    "data": ("str | null", "the documents analysed (null: the held-out documents of the pretraining corpus)"),
    "max_docs": ("int", "documents analysed"),
    "seq_len": ("int | null", "tokens per analysed window (null: the pretraining length)"),
    "window": ("int | null", "the window of 'mass beyond the window' for layers without one of their own"),
}
EXTRAPOLATION_KEYS = {
    "multiples": ("list[int] | null", "evaluation lengths as multiples of the training length"),
    "lengths": ("list[int] | null", "evaluation lengths in tokens (instead of multiples)"),
    "tokens": ("int | null", "held-out tokens of each document evaluated (T)"),
    "stride": ("int | null", "stride of the evaluation windows"),
    "blockwise": ("bool", "also evaluate with blocks of half the training length (relative positions)"),
    "resolution": ("bool", "also measure attention resolution"),
    "max_docs": ("int", "held-out documents evaluated"),
    "batch_size": ("int", "sequences per evaluation batch"),
}
COMPUTE_UNITS = {"flops": "training FLOPs", "seconds": "training-step seconds", "tokens": "training tokens"}


def _value(v) -> str:
    return json.dumps(v, default=str)


def _lookup(cfg: dict, path: str, default):
    """The value at a dotted ``path`` of a resolved config; a key missing from its mapping has ``default``;
    '-' where the path crosses a value that is not a mapping (data.tokenizer.vocab_size of 'bytes')."""
    node = cfg
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.endswith("[]"):  # stages[].steps: one value per phase, when the phases are a list
            node = node.get(part[:-2]) if isinstance(node, dict) else None
            rest = ".".join(parts[i + 1:])
            return [_lookup(s, rest, default) for s in node] if isinstance(node, list) else "-"
        if not isinstance(node, dict):
            return "-"
        if part not in node:
            return default
        node = node[part]
    return node


def _varies(comp: dict) -> dict[str, list[str]]:
    """Base key -> ['variant: value', ...] for every key a variant's ``set`` gives."""
    out: dict[str, list[str]] = {}
    for v in comp["variants"]:
        for k, val in v["set"].items():
            out.setdefault(k, []).append(f"{v['name']}: {_value(val)}")
    return out


def comparison_rows(path: str, overrides: list[str]) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """A comparison config's keys in groups: [(heading, [(key, type, value, help), ...]), ...]."""

    from longctx.experiments.compare import load_comparison
    from longctx.tasks.common import option_keys, task_options
    from longctx.train.config import DEFAULTS, SECTIONS, all_keys, describe_limits, merge, section_keys, type_name
    from longctx.train.finetune import deep_merge, task_class

    comp = load_comparison(path, overrides)
    if comp.get("compute"):  # one entry per (variant, budget): list the file's variants, once each
        by_name = {v["name"]: v for v in comp["variants"]}
        comp["reference"] = by_name[comp["reference"]]["compute"]["variant"]
        comp["variants"] = [dict(v, name=name) for name, v in
                            {v["compute"]["variant"]: v for v in reversed(comp["variants"])}.items()][::-1]
    varies = _varies(comp)

    def kind(k) -> str:
        limits = describe_limits(k)
        return type_name(k.annotation) + (f" ({limits})" if limits else "")

    groups = []
    own = [(k, t, _value(comp[k]), h) for k, (t, h) in COMPARISON_KEYS.items()]
    own += [(f"variants.{v['name']}", "set", ", ".join(f"{k}={_value(x)}" for k, x in v["set"].items()) or "-",
             "what this variant changes (in the file only, not an override)") for v in comp["variants"]]
    groups.append(("the comparison (`longctx compare --config F KEY=VALUE` sets these by the same names)", own))

    base = []
    for k in all_keys():
        if k.path == "name":  # each run is named after its variant; `name` is the comparison's (above)
            continue
        v = _lookup(comp["base"], k.path, k.default)
        help_ = k.help
        if k.path in varies:
            help_ = f"[set by the variants: {'; '.join(varies[k.path])}] " + help_
        base.append((k.path, kind(k), v if v == "-" else _value(v), help_))
    groups.append(("base: every variant's pretraining config (the values the comparison gives; the variants "
                   "change only the keys marked)", base))

    task_sets = {}
    for v in comp["variants"]:
        for k, val in v.get("task_sets", {}).items():
            task_sets.setdefault(k, []).append(f"{v['name']}: {_value(val)}")
    for task, spec in (comp.get("finetune") or {}).items():
        cls = task_class(task)
        pre = f"finetune.{task}"
        rows = [(f"{pre}.{k}", t, _value(spec.get(k, 1 if k == "seeds" else None)), h)
                for k, (t, h) in FINETUNE_KEYS.items()]
        sections = {s: spec[s] for s in ("model", "data", "train") if spec.get(s)}
        ft = merge(DEFAULTS, deep_merge(getattr(cls, "CONFIG", {}), sections))
        ft["data"]["seed"] = comp["base"]["data"]["seed"]  # every finetuning scores the comparison's examples
        if cls.from_scratch:
            model = deep_merge(comp["base"]["model"], spec.get("model") or {})
            from longctx.train.config import model_keys
            rows += [(f"{pre}.model.{name}", kind(mk), _value(model[name]),
                      "trained from scratch: each variant's model with this on top") for name, mk in model_keys().items()
                     if name in (spec.get("model") or {})]
        for sec in SECTIONS:
            for name, k in section_keys(SECTIONS[sec]).items():
                if sec == "data" and name == "tokenizer" and not cls.from_scratch:
                    rows.append((f"{pre}.data.tokenizer", kind(k), "-", "each pretrained model's own tokenizer"))
                    continue
                rows.append((f"{pre}.{sec}.{name}", kind(k), _value(ft[sec].get(name, k.default)), k.help))
        opts = task_options(cls, copy.deepcopy(spec.get("task") or {}))
        for name, t, _default, help_ in option_keys(cls):
            if name in task_sets and (name == "global_tokens" or name in cls.OPTIONS):
                help_ = f"[set by the variants: {'; '.join(task_sets[name])}] " + help_
            rows.append((f"{pre}.task.{name}", t, _value(opts[name]), help_))
        groups.append((f"{pre}: {'trained from scratch with each variant' + chr(39) + 's attention' if cls.from_scratch else 'finetuned from each pretrained model (its model and tokenizer)'}"
                       f"; task.* are the {task} task's options", rows))
    if comp.get("analysis"):
        groups.append(("analysis: where each variant's attention goes",
                       [(f"analysis.{k}", t, _value(comp["analysis"][k]), h) for k, (t, h) in ANALYSIS_KEYS.items()]))
    if comp.get("extrapolation"):
        groups.append(("extrapolation: every variant evaluated at longer lengths",
                       [(f"extrapolation.{k}", t, _value(comp["extrapolation"][k]), h)
                        for k, (t, h) in EXTRAPOLATION_KEYS.items()]))
    if comp.get("compute"):
        unit = comp["compute"]["unit"]
        groups.append(("compute: every variant pretrained at each budget",
                       [(f"compute.{unit}", "list[float]", _value(comp["compute"]["budgets"]),
                         f"the budgets, in {COMPUTE_UNITS[unit]} (one unit of flops, seconds, tokens)")]))
    return groups


def _print_comparison(groups, markdown: bool) -> None:
    if markdown:
        print("| key | type | value | help |\n|---|---|---|---|")
        for _, rows in groups:
            for r in rows:
                print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return
    rows = [r for _, g in groups for r in g]
    width = [min(w, max(len(r[i]) for r in rows)) for i, w in enumerate((48, 34, 34))]
    for i, (heading, group) in enumerate(groups):
        print(("\n" if i else "") + f"# {heading}")
        for key, kind, value, help_ in group:
            print(f"{key:<{width[0]}}  {kind:<{width[1]}}  {value:<{width[2]}}  {help_}")


def run_show(args) -> int:
    if args.config:
        from longctx.train.config import load_yaml
        if isinstance(raw := load_yaml(args.config), dict) and "variants" in raw:  # a comparison (longctx compare)
            _print_comparison(comparison_rows(args.config, args.overrides), args.markdown)
            return 0
    if args.config or args.overrides:
        import yaml

        from longctx.train.config import load_yaml, resolve
        cfg = resolve(load_yaml(args.config) if args.config else {}, args.overrides)
        print(yaml.safe_dump(cfg, sort_keys=False).rstrip())
        return 0
    rows = key_rows()
    if not rows:
        raise LongctxError("no config keys are declared")
    if args.markdown:
        print("| key | type | default | help |\n|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return 0
    width = [min(34, max(len(r[i]) for r in rows)) for i in range(3)]
    for path, kind, default, help_ in rows:
        print(f"{path:<{width[0]}}  {kind:<{width[1]}}  {default:<{width[2]}}  {help_}")
    return 0
