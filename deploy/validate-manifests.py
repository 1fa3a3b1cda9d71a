#!/usr/bin/env python3
"""Validates every manifest under deploy/kubernetes offline; `.ci/run` runs it.

Three checks, no cluster needed:

1. Each built-in resource (ConfigMap, Deployment, Service, ...) against the Kubernetes OpenAPI
   schemas that the `kubernetes-validate` package ships, strictly (an unknown or misspelt field
   is an error), for the oldest and the newest Kubernetes version these manifests claim.
2. The PodMonitor (a custom resource of the Prometheus Operator, which `kubernetes-validate` has
   no schema for) against the typed models that `cloudcoil-models-prometheus-operator` generates
   from the operator's CRDs: field types by the models, and every field name checked against
   them here (the models alone ignore unknown fields).
3. What no schema can say: ports, names and paths that refer to each other — the `--admin` and
   `--listen` ports against the named container ports and the scrape annotations, probes on the
   named admin port (`/healthz` live, `/readyz` ready), volume mounts against volumes, the
   `--profile` file against the ConfigMap's keys and mount, the token file against the Secret's
   mount, Service and PodMonitor selectors against the pods, the security settings every
   container must have.

Usage: validate-manifests.py [DIR] (default: deploy/kubernetes beside this file). Exit 0 when
everything passed, 1 with one line per problem otherwise. The flags and environment variables
themselves are checked against the real binary by tests/it/deploy.rs.
"""

import pathlib
import sys

try:
    import yaml
    import kubernetes_validate.utils as kv
except ImportError as e:
    sys.exit(f"validate-manifests: {e}: install with "
             "`python3 -m pip install kubernetes-validate cloudcoil-models-prometheus-operator` "
             "(.ci/run does it)")

# Native sidecars (`restartPolicy: Always` on an init container) are on by default from 1.29.
KUBERNETES_VERSIONS = ["1.29", kv.major_minor(kv.latest_version())]
# Made by `kubectl create secret` as the manifests say, never committed.
EXTERNAL_SECRETS = {"mqtt-chaos-admin-token": {"token"}}
PROXY_IMAGE = "mqtt-chaos:"

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def load(directory):
    docs = []
    for path in sorted(directory.rglob("*.yaml")):
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc:
                    docs.append((f"{path.relative_to(directory)}#{i + 1} "
                                 f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return docs


def schema_check(where, doc):
    """True when the package had a schema for it."""
    for version in KUBERNETES_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            return False
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(where, f"Kubernetes {e.version}: {path}: {e.message}")
    return True


def strict_fields(where, data, model, path=""):
    """Every key of `data` must be a field (by its alias) of the pydantic `model`, recursively."""
    import typing
    from pydantic import BaseModel

    if isinstance(data, list):
        for i, item in enumerate(data):
            strict_fields(where, item, model, f"{path}[{i}]")
        return
    if not (isinstance(data, dict) and isinstance(model, type) and issubclass(model, BaseModel)):
        return
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            problem(where, f"{path}.{key}: no such field in {model.__name__} "
                           f"(known: {', '.join(sorted(fields))})")
            continue
        for inner in models_in(field.annotation, typing):
            strict_fields(where, value, inner, f"{path}.{key}")


def models_in(annotation, typing):
    """The classes an annotation such as Optional[List[X]] can hold."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    out = []
    for a in args:
        out.extend(models_in(a, typing))
    return out


def podmonitor_check(where, doc):
    try:
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor
    except ImportError as e:
        problem(where, f"cannot validate the PodMonitor: {e} "
                       "(python3 -m pip install cloudcoil-models-prometheus-operator)")
        return
    try:
        PodMonitor.model_validate(doc)
    except Exception as e:  # pydantic.ValidationError: one line per error
        problem(where, " ".join(str(e).split()))
    strict_fields(where, doc, PodMonitor)


def arg_value(args, flag):
    if flag in args and args.index(flag) + 1 < len(args):
        return args[args.index(flag) + 1]
    return None


def port_of(address):
    return int(address.rstrip("/").rsplit(":", 1)[1].split("/")[0])


def pod_checks(where, pod_meta, pod, configmaps):
    annotations = pod_meta.get("annotations", {})
    sec = pod.get("securityContext", {})
    if sec.get("runAsNonRoot") is not True or not sec.get("runAsUser"):
        problem(where, "the pod needs runAsNonRoot: true and a fixed runAsUser")
    if sec.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(where, "the pod needs seccompProfile RuntimeDefault")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    for c in containers:
        cw = f"{where} container {c['name']}"
        csec = c.get("securityContext", {})
        if csec.get("readOnlyRootFilesystem") is not True:
            problem(cw, "readOnlyRootFilesystem must be true")
        if csec.get("allowPrivilegeEscalation") is not False:
            problem(cw, "allowPrivilegeEscalation must be false")
        if csec.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(cw, "capabilities must drop ALL")
        if "memory" not in c.get("resources", {}).get("limits", {}):
            problem(cw, "needs a memory limit")
        mounts = {}
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problem(cw, f"mounts volume {m['name']}, which the pod does not have")
            if "subPath" in m:
                problem(cw, f"mount {m['name']} uses subPath: it never sees a change")
            mounts[m["mountPath"]] = volumes.get(m["name"], {})
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                problem(where, f"volume {v['name']}: no ConfigMap {v['configMap']['name']} here")
            if "secret" in v:
                name = v["secret"]["secretName"]
                keys = {i["key"] for i in v["secret"].get("items", [])}
                if name not in EXTERNAL_SECRETS or not keys <= EXTERNAL_SECRETS[name]:
                    problem(where, f"volume {v['name']}: Secret {name} {sorted(keys)} is not the "
                                   "documented one")
        if not c.get("image", "").startswith(PROXY_IMAGE):
            continue
        if c in pod.get("initContainers", []) and c.get("restartPolicy") != "Always":
            problem(cw, "as an init container the proxy must be a native sidecar "
                        "(restartPolicy: Always), or the pod never starts its other containers")
        args = c.get("args", [])
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        admin = arg_value(args, "--admin")
        if admin is None or not admin.startswith("0.0.0.0:"):
            problem(cw, "--admin must listen beyond loopback (0.0.0.0:PORT) for probes and scrapes")
        elif port_of(admin) != ports.get("admin"):
            problem(cw, f"--admin {admin} but the port named admin is {ports.get('admin')}")
        elif annotations.get("prometheus.io/scrape") == "true" and \
                annotations.get("prometheus.io/port") != str(ports["admin"]):
            problem(where, f"prometheus.io/port {annotations.get('prometheus.io/port')} is not "
                           f"the admin port {ports['admin']}")
        if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
            problem(where, "prometheus.io/path must be /metrics")
        listen = arg_value(args, "--listen")
        if listen is None:
            problem(cw, "no --listen")
        elif "mqtt" in ports and port_of(listen) != ports["mqtt"]:
            problem(cw, f"--listen {listen} but the port named mqtt is {ports['mqtt']}")
        for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") != "admin":
                problem(cw, f"{probe} must be GET {path} on the port named admin")
        for flag, kind in [("--profile", "configMap"), ("--admin-token-file", "secret")]:
            value = arg_value(args, flag)
            if value is None:
                problem(cw, f"no {flag}")
                continue
            directory, _, file = value.rpartition("/")
            volume = mounts.get(directory)
            if volume is None or kind not in volume:
                problem(cw, f"{flag} {value}: no {kind} volume mounted at {directory}")
            elif kind == "configMap" and file not in configmaps.get(volume["configMap"]["name"], {}):
                problem(cw, f"{flag} {value}: ConfigMap {volume['configMap']['name']} has no key {file}")
            elif kind == "secret" and file not in {i["path"] for i in volume["secret"].get("items", [])}:
                problem(cw, f"{flag} {value}: the Secret volume has no item {file}")
        profiles_dir = arg_value(args, "--profiles-dir")
        if profiles_dir is not None and profiles_dir not in mounts:
            problem(cw, f"--profiles-dir {profiles_dir} is not a mounted volume")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def main():
    here = pathlib.Path(__file__).resolve().parent
    directory = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here / "kubernetes"
    docs = load(directory)
    if not docs:
        sys.exit(f"validate-manifests: no manifest under {directory}")
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
    pods = [(w, d["spec"]["template"]) for w, d in docs if d["kind"] == "Deployment"]
    for where, doc in docs:
        before = len(problems)
        if schema_check(where, doc):
            if len(problems) == before:
                print(f"ok: {where}: Kubernetes {' and '.join(KUBERNETES_VERSIONS)} schemas (strict)")
        elif doc.get("kind") == "PodMonitor":
            podmonitor_check(where, doc)
            if len(problems) == before:
                print(f"ok: {where}: a CRD, not in kubernetes-validate: checked against "
                      "cloudcoil-models-prometheus-operator's models (types and field names)")
        else:
            problem(where, f"no schema for {doc.get('apiVersion')} {doc.get('kind')}: "
                           "neither a Kubernetes kind nor one this script knows")
    for where, template in pods:
        pod_checks(where, template.get("metadata", {}), template["spec"], configmaps)
        deployment = next(d for w, d in docs if w == where)
        if not selects(deployment["spec"]["selector"], template["metadata"]["labels"]):
            problem(where, "the Deployment's selector does not select its own pods")
    for where, doc in docs:
        if doc["kind"] == "Service":
            matched = [t for _, t in pods if selects({"matchLabels": doc["spec"]["selector"]},
                                                    t["metadata"]["labels"])]
            if not matched:
                problem(where, "its selector matches no pod here")
            for t in matched:
                names = {p["name"] for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])
                         for p in c.get("ports", [])}
                for p in doc["spec"]["ports"]:
                    if p["targetPort"] not in names:
                        problem(where, f"targetPort {p['targetPort']} is no named container port")
        if doc["kind"] == "PodMonitor":
            spec = doc["spec"]
            matched = [t for _, t in pods if selects(spec["selector"], t["metadata"]["labels"])]
            if len(matched) != len(pods):
                problem(where, "its selector misses some mqtt-chaos pods")
            for endpoint in spec["podMetricsEndpoints"]:
                for t in matched:
                    names = {p["name"] for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])
                             for p in c.get("ports", [])}
                    if endpoint.get("port") not in names:
                        problem(where, f"port {endpoint.get('port')} is no named container port")
                cred = endpoint.get("authorization", {}).get("credentials") or endpoint.get("bearerTokenSecret")
                if not cred or cred.get("key") not in EXTERNAL_SECRETS.get(cred.get("name"), set()):
                    problem(where, "must scrape with the admin token Secret (mqtt-chaos-admin-token, key token)")
    for p in problems:
        print(f"error: {p}")
    print(f"{len(docs)} manifests, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
