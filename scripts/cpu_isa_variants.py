"""The CPU kernels' ISA variants for `make test`: --extra prints the runnable variants
other than the one "auto" picks (the CPU kernel tests rerun once on each), --summary one
line: what is compiled, what the tests ran on, and what this CPU cannot run and why."""
import sys

from torch_pagedkv import knobs


def main(arg: str) -> None:
    info = knobs.cpu_isa_info()
    with knobs.override(cpu_isa="auto"):
        auto = knobs.cpu_isa_info()["active"]
    extra = [v for v in info["runnable"] if v != auto]
    if arg == "--extra":
        print(" ".join(extra))
        return
    lacking = [v for v in info["compiled"] if v not in info["runnable"]]
    line = (f"CPU ISA variants: compiled {' '.join(info['compiled'])}; tests ran on "
            f"{' '.join([auto] + extra)}")
    if lacking:
        why = "; ".join(f"{v}: no {' '.join(info['missing'][v])}" for v in lacking)
        line += f"; not runnable on this CPU: {' '.join(lacking)} ({why})"
    print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "--summary")
