"""Checks of what deploy/ ships, against pgnear itself.

    check.py dashboard                 the dashboard's structure; every query
                                       parses (promtool check rules)
    check.py manifests OUT.toml        the Kubernetes files agree with each
                                       other; writes the ConfigMap's
                                       proxy.toml to OUT.toml for pgnear check
    check.py names SCRAPE              every metric, label and label value the
                                       alert rules, their unit tests' series
                                       and the dashboard use is in a real
                                       /metrics scrape (values: or in pgnear's
                                       source, for those that need a fault to
                                       appear)
    check.py live PROMETHEUS_URL       every dashboard query runs on a
                                       Prometheus scraping a live pgnear,
                                       returns series, and has the labels its
                                       legend names

Run by tests/deploy/run.sh and tests/container/run.sh with the venv of
tests/deploy/venv.sh (PyYAML). Exits 1 on the first kind of fault found,
after listing every fault of that kind.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "deploy/prometheus/pgnear-rules.yml")
DASHBOARD = os.path.join(ROOT, "deploy/grafana/pgnear.json")
KUBE = os.path.join(ROOT, "deploy/kubernetes")

# Labels Prometheus adds to every scraped series; pgnear never exports them.
TARGET_LABELS = {"instance", "job"}
# Labels whose values are deployment names, not pgnear's fixed sets.
NAME_LABELS = TARGET_LABELS | {"node", "region", "cluster"}

SELECTOR = re.compile(r"\b(pgnear_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def fail(title, faults):
    if faults:
        print(f"{title}:")
        for fault in faults:
            print(f"  {fault}")
        sys.exit(1)


# === what the rules and the dashboard use ===


def rule_exprs():
    with open(RULES) as f:
        groups = yaml.safe_load(f)["groups"]
    return [(f"rule {r['alert']}", r["expr"]) for g in groups for r in g["rules"]]


def test_series():
    """The input series of the rules' unit tests: they must look like what
    pgnear exports, or the tests prove nothing."""
    with open(RULES.replace(".yml", ".test.yml")) as f:
        tests = yaml.safe_load(f)["tests"]
    return [(f"test '{t['name']}'", s["series"]) for t in tests for s in t["input_series"]]


def load_dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_targets(dashboard):
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def dashboard_exprs(dashboard):
    exprs = [(f"panel {p['id']} ({p['title']}) {t['refId']}", t["expr"]) for p, t in dashboard_targets(dashboard)]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            exprs.append((f"variable {var['name']}", inner.group(1) if inner else var["definition"]))
    return exprs


def grafana_to_promql(expr, rate_interval):
    """A dashboard query as Prometheus runs it once Grafana has filled in
    its variables (all instances, all nodes)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(instance|node)\}?", ".+", expr)


# === dashboard ===


def check_dashboard():
    dashboard = load_dashboard()
    faults = []
    ids = [p["id"] for p in panels(dashboard)]
    faults += [f"panel id {i} is used twice" for i in set(ids) if ids.count(i) > 1]
    if dashboard.get("uid") != "pgnear":
        faults.append("the dashboard's uid is not pgnear")
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for need in ("datasource", "instance", "node"):
        if need not in names:
            faults.append(f"no ${need} variable")
    cells = {}
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        if pos["x"] < 0 or pos["x"] + pos["w"] > 24:
            faults.append(f"panel {panel['id']} sticks out of the 24-column grid")
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                if (x, y) in cells:
                    faults.append(f"panel {panel['id']} overlaps panel {cells[(x, y)]}")
                    break
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            faults.append(f"panel {panel['id']} does not use the $datasource variable")
        if not panel.get("targets"):
            faults.append(f"panel {panel['id']} has no query")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                faults.append(f"panel {panel['id']} {target['refId']} does not use the $datasource variable")
    fail("dashboard structure", sorted(set(faults)))

    # promtool parses each query as a recording rule's expression.
    rules = [{"record": f"dashboard:query_{n}", "expr": grafana_to_promql(expr, "5m")}
             for n, (_, expr) in enumerate(dashboard_exprs(dashboard))]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    try:
        out = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        fail("dashboard queries that do not parse", [out.stdout + out.stderr])
    print(f"dashboard: {len(ids)} panels, {len(rules)} queries parse")


# === Kubernetes manifests ===


def load_kube():
    docs = {}
    for name in sorted(os.listdir(KUBE)):
        if name.endswith(".yaml"):
            with open(os.path.join(KUBE, name)) as f:
                for doc in yaml.safe_load_all(f):
                    docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def check_manifests(toml_out):
    docs = load_kube()
    faults = []
    deployments = [d for (kind, _), d in docs.items() if kind == "Deployment"]
    if len(deployments) != 1:
        fail("manifests", [f"expected one Deployment, found {len(deployments)}"])
    pod = deployments[0]["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    pgnear = containers.get("pgnear")
    if pgnear is None:
        fail("manifests", ["the Deployment has no container named pgnear"])
    config_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == pgnear["volumeMounts"][0]["name"])
    configmap = docs.get(("ConfigMap", config_volume["configMap"]["name"]))
    if configmap is None:
        fail("manifests", [f"no ConfigMap {config_volume['configMap']['name']} for the pgnear volume"])
    toml = configmap["data"]["proxy.toml"]
    with open(toml_out, "w") as f:
        f.write(toml)

    # Every ${VAR} of proxy.toml is in pgnear's environment, from a Secret
    # key that exists.
    env = {e["name"]: e for e in pgnear.get("env", [])}
    for var in sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", toml))):
        if var not in env:
            faults.append(f"proxy.toml uses ${{{var}}}, which the pgnear container's env does not set")
            continue
        ref = env[var].get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            faults.append(f"${{{var}}} is not taken from a Secret")
            continue
        secret = docs.get(("Secret", ref["name"]))
        keys = set((secret or {}).get("stringData", {})) | set((secret or {}).get("data", {}))
        if ref["key"] not in keys:
            faults.append(f"${{{var}}}: Secret {ref['name']} has no key {ref['key']}")

    # The admin port: proxy.toml, the container port, the probes and the
    # scrape annotation agree.
    admin = re.search(r'^admin_listen\s*=\s*"([^"]+):(\d+)"', toml, re.M)
    listen = re.search(r'^listen\s*=\s*"([^"]+):(\d+)"', toml, re.M)
    ports = {p["name"]: p["containerPort"] for p in pgnear["ports"]}
    if not admin:
        faults.append("proxy.toml sets no admin_listen")
    else:
        if admin.group(1) in ("127.0.0.1", "localhost", "::1"):
            faults.append("admin_listen is on loopback: the kubelet and Prometheus cannot reach it")
        if ports.get("admin") != int(admin.group(2)):
            faults.append(f"container port admin is {ports.get('admin')}, admin_listen's is {admin.group(2)}")
        annotation = pod["metadata"].get("annotations", {}).get("prometheus.io/port")
        if annotation != admin.group(2):
            faults.append(f"prometheus.io/port is {annotation}, admin_listen's port is {admin.group(2)}")
    if not listen or ports.get("postgres") != int(listen.group(2)):
        faults.append("container port postgres does not match proxy.listen")
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        got = pgnear.get(probe, {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") != "admin":
            faults.append(f"{probe} is not GET {path} on the admin port")
        if "?" in got.get("path", ""):
            faults.append(f"{probe} passes a query: /health?max_lag_ms fails when a replica lags")
    pre_stop = pgnear.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        faults.append("pgnear has no preStop hook")
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    sleep = pre_stop and pre_stop.get("exec", {}).get("command", [None, 0])
    if sleep and sleep[0] == "sleep" and int(sleep[1]) >= grace:
        faults.append(f"preStop sleeps {sleep[1]} s of a {grace} s grace period: nothing left to drain")
    security = pgnear.get("securityContext", {})
    if security.get("runAsUser") != 10001 or pod["spec"].get("securityContext", {}).get("runAsNonRoot") is not True:
        faults.append("pgnear does not run as the image's uid 10001 with runAsNonRoot")
    if not pgnear.get("resources", {}).get("requests", {}).get("memory"):
        faults.append("pgnear has no memory request")
    fail("manifests that disagree", faults)
    print(f"manifests: {len(docs)} objects agree; proxy.toml written to {toml_out}")


# === names against a scrape ===


def parse_scrape(path):
    """{family: {"type": t, "labels": {label: {values}}}} from a text scrape."""
    families = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s")
    with open(path) as f:
        for line in f:
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                families[name] = {"type": kind, "labels": {}}
                continue
            match = sample.match(line)
            if not match or line.startswith("#"):
                continue
            name = match.group(1)
            family = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and families.get(name[: -len(suffix)], {}).get("type") == "histogram":
                    family = name[: -len(suffix)]
            labels = families.setdefault(family, {"type": "untyped", "labels": {}})["labels"]
            for label, _, value in MATCHER.findall(match.group(3) or ""):
                labels.setdefault(label, set()).add(value)
    return families


def source_literals():
    literals = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "src")):
        for name in files:
            if name.endswith(".rs"):
                with open(os.path.join(dirpath, name)) as f:
                    literals.update(re.findall(r'"([a-z0-9_]+)"', f.read()))
    return literals


def plain_values(op, value):
    """The label values a matcher names, when it names a fixed set."""
    if op in ("=", "!="):
        return [value]
    if re.fullmatch(r"[a-z0-9_]+(\|[a-z0-9_]+)*", value):
        return value.split("|")
    return []


def check_names(scrape):
    families = parse_scrape(scrape)
    literals = source_literals()
    exprs = rule_exprs() + dashboard_exprs(load_dashboard()) + test_series()
    faults, used = [], set()
    for where, expr in exprs:
        expr = grafana_to_promql(expr, "5m")
        for name, braces in SELECTOR.findall(expr):
            family, suffix = name, ""
            for s in HISTOGRAM_SUFFIXES:
                if name.endswith(s) and name[: -len(s)] in families:
                    family, suffix = name[: -len(s)], s
            used.add(family)
            if family not in families:
                faults.append(f"{where}: {name} is not in the scrape")
                continue
            if suffix and families[family]["type"] != "histogram":
                faults.append(f"{where}: {name}: {family} is a {families[family]['type']}, not a histogram")
            labels = families[family]["labels"]
            for label, op, value in MATCHER.findall(braces or ""):
                if label in TARGET_LABELS or (label == "le" and suffix == "_bucket"):
                    continue
                if label not in labels:
                    faults.append(f"{where}: {family} has no label {label} (it has {', '.join(sorted(labels))})")
                    continue
                if label in NAME_LABELS:
                    continue
                for v in plain_values(op, value):
                    if v not in labels[label] and v not in literals:
                        faults.append(f'{where}: {family}{{{label}="{v}"}}: no such value in the scrape or in src/')
    fail("names the rules and the dashboard use that pgnear does not export", faults)
    print(f"names: the {len(used)} metrics that the alert rules, their tests and the dashboard use are in the scrape "
          f"({len(families)} families), with their labels")


# === queries against a live Prometheus ===


def query(url, expr):
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        return json.load(r)


def check_live(url):
    faults, counts = [], []
    for panel, target in dashboard_targets(load_dashboard()):
        where = f"panel {panel['id']} ({panel['title']}) {target['refId']}"
        expr = grafana_to_promql(target["expr"], "30s")
        try:
            answer = query(url, expr)
        except Exception as error:  # noqa: BLE001 - any failure is a fault
            faults.append(f"{where}: {error}")
            continue
        result = answer["data"]["result"]
        counts.append(len(result))
        if not result:
            faults.append(f"{where}: no series: {expr}")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            if any(label not in series["metric"] for series in result):
                faults.append(f"{where}: its legend uses {label}, which its series lack")
    fail("dashboard queries that fail on a live Prometheus", faults)
    print(f"live: {len(counts)} dashboard queries returned {sum(counts)} series, each at least one")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "dashboard":
        check_dashboard()
    elif command == "manifests":
        check_manifests(args[0])
    elif command == "names":
        check_names(args[0])
    elif command == "live":
        check_live(args[0])
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
