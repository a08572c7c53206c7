"""Renders and lints charts/kpr with real Helm, for tests/helm_chart.rs.

Uses the Helm SDK for Python (pip install helm-python-sdk), which wraps
Helm's own Go engine; exits with 3 when it is not installed. Argument: a JSON
request {"chart", "release", "namespace", "value_sets": {name: overrides}}.
Prints {"helm_version", "rendered": {name: {file: text}}, "lint": {name: report}}.
"""
import json
import sys

try:
    import helm_python as helm
except ImportError as e:
    print(e, file=sys.stderr)
    sys.exit(3)

request = json.loads(sys.argv[1])
answer = {"helm_version": helm.helm_sdk_version(), "rendered": {}, "lint": {}}
with helm.Chart.load(request["chart"]) as chart:
    for name, overrides in request["value_sets"].items():
        answer["rendered"][name] = chart.render(
            overrides,
            name=request["release"],
            namespace=request["namespace"],
            is_install=True,
        )
        answer["lint"][name] = helm.lint(
            request["chart"], overrides, strict=True, namespace=request["namespace"]
        )
json.dump(answer, sys.stdout)
