"""`helm lint` and `helm template` for tests/helm_chart.rs, with Helm's own code.

The Helm SDK for Python (PyPI helm-python-sdk, installed by tools/setup-deps)
embeds Helm v4's Go library (libhelm_c), not a `helm` executable: this is
the small command line over it that the test needs, with helm's spelling:

  helm.py version
  helm.py lint CHART [--strict] [--kube-version V] [VALUES...]
  helm.py template RELEASE CHART [-n NS] [--kube-version V] [--api-versions G/V]... [VALUES...]
  helm.py template RELEASE CHART --kube-version V1 --kube-version V2... --output-dir DIR [...]
  helm.py notes RELEASE CHART [-n NS] [VALUES...]

VALUES are helm's -f FILE, --set EXPR, --set-string EXPR (Helm's own
parsers), merged in that order as helm merges them. `template` prints the
manifests as helm does (`---` and `# Source:` before each file, in file
order; NOTES.txt left out, `notes` prints it), or, given several
--kube-version (one process for all, which helm cannot), writes what it
would print for each to DIR/VERSION.yaml; `lint` prints helm's
`[SEVERITY] path: message` lines and, as `helm lint --strict`, fails on
warnings too.
"""
import argparse
import json
import os
import sys

import helm_python as helm
from helm_python import _native

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge(base, over):
    """Helm's coalescing of -f files and --set: maps merge, the rest replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def user_values(args):
    values = {}
    for kind, expr in args.values:
        if kind == "file":
            with open(expr) as f:
                merge(values, helm.values_from_yaml(f.read()) or {})
        elif kind == "set":
            merge(values, helm.parse_set_string(expr))
        else:
            merge(values, helm.parse_set_string_values(expr))
    return values


def render(args, kube_version=None):
    """Template path -> text, as `helm template` renders them."""
    chart = helm.Chart.load(args.chart)
    opts = {"name": args.release, "namespace": args.namespace, "is_install": True}
    if kube_version:
        opts["kube_version"] = kube_version
    if args.api_versions:
        opts["api_versions"] = args.api_versions
    # Chart.render() does not expose kube_version/api_versions; the C entry
    # point under it takes them (helm template's --kube-version, --api-versions).
    return json.loads(
        _native.call_string(
            "helm_render", chart._raw(), json.dumps(user_values(args)), json.dumps(opts)
        )
    )


def manifests(files):
    out = []
    for path in sorted(files):
        text = files[path]
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        out.append(f"---\n# Source: {path}\n{text}")
        if not text.endswith("\n"):
            out.append("\n")
    return "".join(out)


def template(args):
    versions = args.kube_version or [None]
    if len(versions) == 1 and not args.output_dir:
        sys.stdout.write(manifests(render(args, versions[0])))
        return 0
    if not args.output_dir:
        raise SystemExit("several --kube-version need --output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    for version in versions:
        with open(os.path.join(args.output_dir, f"{version}.yaml"), "w") as f:
            f.write(manifests(render(args, version)))
    return 0


def notes(args):
    files = render(args, None)
    sys.stdout.write("".join(t for p, t in files.items() if p.endswith("NOTES.txt")))
    return 0


def lint(args):
    report = helm.lint(
        args.chart,
        user_values(args),
        strict=args.strict,
        namespace=args.namespace,
        kube_version=(args.kube_version or [None])[-1],
    )
    failed = bool(report["errors"])
    for m in report["messages"]:
        severity = SEVERITY.get(m["severity"], m["severity"])
        print(f"[{severity}] {m['path']}: {m['error'].strip()}")
        failed |= m["severity"] >= (2 if args.strict else 3)
    print(f"1 chart(s) linted, {1 if failed else 0} chart(s) failed")
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(prog="helm.py")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version")
    for name in ("lint", "template", "notes"):
        p = sub.add_parser(name)
        if name != "lint":
            p.add_argument("release")
        p.add_argument("chart")
        p.add_argument("-n", "--namespace", default="default")
        p.add_argument("--kube-version", action="append")
        p.add_argument("--output-dir")
        p.add_argument("--api-versions", action="append", default=[])
        p.add_argument("--strict", action="store_true")
        p.add_argument("-f", "--values", dest="values", action="append", default=[],
                       type=lambda v: ("file", v))
        p.add_argument("--set", dest="values", action="append", type=lambda v: ("set", v))
        p.add_argument("--set-string", dest="values", action="append",
                       type=lambda v: ("string", v))
    args = parser.parse_args()
    if args.command == "version":
        print(helm.helm_sdk_version())
        return 0
    try:
        return {"lint": lint, "template": template, "notes": notes}[args.command](args)
    except helm.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
