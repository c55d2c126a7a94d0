"""`python -m flashdelta COMMAND ...`

    demo    LoRA training steps of a Qwen3.5-MoE model, unpatched then patched (flashdelta.demo)

(The op benchmarks are `python -m flashdelta.bench ...`.)
"""

import sys

_COMMANDS = {"demo": "LoRA training steps of a Qwen3.5-MoE model, unpatched then patched"}


def _usage() -> str:
    lines = ["usage: python -m flashdelta COMMAND [options]", "", "commands:"]
    lines += [f"  {name:8s}{text}" for name, text in _COMMANDS.items()]
    lines += ["", "`python -m flashdelta COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
