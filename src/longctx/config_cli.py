"""`longctx config show`: every config key with its type, default and help, generated from the
declarations in ``longctx.train.config`` (the model keys from ``LongctxConfig``'s signature), so the
documentation cannot drift from what is checked. With ``--config FILE`` and/or ``KEY=VALUE`` overrides it
prints the resolved config instead (YAML), checked as `longctx pretrain` would check it.
"""
from __future__ import annotations

import json

from longctx.errors import LongctxError


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


def run_show(args) -> int:
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
