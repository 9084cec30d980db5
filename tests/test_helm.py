"""The Helm chart: linted and rendered by Helm's own Go SDK, and checked against the service.

``helm-python-sdk`` (dev extra) carries Helm's engine as a shared library, so the chart
is rendered exactly as ``helm template`` would render it, without a helm binary or a
cluster. The rendered settings are then fed to the real consumer code: its settings
resolver (every key must be an option of ``rbstream consume``) and librdkafka itself
(every Kafka property and value must be accepted), so the chart cannot drift from the
service it deploys.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "rbstream"
RELEASE, NAMESPACE = "rb", "astro"

#: The optional switches that must render: GPU, KEDA, ServiceMonitor (and the PrometheusRule with them).
ALL_ON = {
    "consumer": {"gpu": {"enabled": True}, "autoscaling": {"keda": {"enabled": True}}},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
}
#: A survey stream with SASL/SCRAM over TLS and a client certificate, as ZTF's and Rubin's need.
SECURED = {
    "kafka": {"securityProtocol": "SASL_SSL",
              "sasl": {"mechanism": "SCRAM-SHA-512", "existingSecret": "survey-sasl"},
              "tls": {"existingSecret": "survey-tls", "certKey": "tls.crt", "keyKey": "tls.key"}},
    "api": {"auth": {"existingSecret": "rb-api-token"}},
}


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def render(values: dict | None = None) -> list[dict]:
    """The chart's manifests for ``values`` (Helm's engine), as parsed YAML documents."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template__"] = path
                docs.append(doc)
    return docs


def kinds(docs: list[dict]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


#: The Kubernetes version the manifests are validated for (the chart's kubeVersion allows >= 1.25).
KUBE_VERSION = "1.30.0"
#: Custom resources the chart may render (their operators' schemas are not Kubernetes'), by kind.
CUSTOM_RESOURCES = {"ScaledObject": "keda.sh/v1alpha1", "TriggerAuthentication": "keda.sh/v1alpha1",
                    "ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1"}


def assert_kubernetes_objects(docs: list[dict]) -> None:
    """Every document is a Kubernetes object valid against Kubernetes' own schema (strict: no unknown
    field), or one of the known custom resources; DNS-1123 names; labelled as the chart's."""
    import kubernetes_validate

    for doc in docs:
        manifest = {k: v for k, v in doc.items() if k != "__template__"}
        if doc["kind"] in CUSTOM_RESOURCES:
            assert doc["apiVersion"] == CUSTOM_RESOURCES[doc["kind"]], doc["__template__"]
        else:
            try:
                kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['__template__']}: {doc['kind']} invalid at {list(exc.path)}: {exc.message}")
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), doc["__template__"]
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, doc["__template__"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{deployment['metadata']['name']}: selector does not match its pods"


def test_chart_lints_clean():
    report = helm.lint(str(CHART), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert problems == []


@pytest.mark.parametrize("values", [ALL_ON, SECURED], ids=["all-on", "secured"])
def test_chart_lints_clean_with_switches(values):
    report = helm.lint(str(CHART), merged(ALL_ON, values), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_defaults_render_the_core_objects():
    docs = render()
    assert_kubernetes_objects(docs)
    assert kinds(docs) == sorted([
        "ServiceAccount", "ConfigMap", "ConfigMap", "Deployment", "Deployment", "Service", "Service",
        "PodDisruptionBudget", "PodDisruptionBudget", "HorizontalPodAutoscaler"])
    consumer = one(docs, "Deployment", "-consumer")
    api = one(docs, "Deployment", "-api")
    assert container(consumer)["image"] == "rbstream:0.1.0"
    assert "nvidia.com/gpu" not in json.dumps(consumer)
    for deployment, port in ((consumer, "metrics"), (api, "http")):
        c = container(deployment)
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    hpa = one(docs, "HorizontalPodAutoscaler", "-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in api["spec"], "the HPA owns the API's replicas"
    service = one(docs, "Service", "-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()


def test_gpu_keda_servicemonitor_and_rules_render():
    docs = render(ALL_ON)
    assert_kubernetes_objects(docs)
    assert {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= set(kinds(docs))
    assert "HorizontalPodAutoscaler" in kinds(docs)  # the API's; KEDA makes the consumer's itself
    consumer = one(docs, "Deployment", "-consumer")
    c = container(consumer)
    assert c["image"] == "rbstream-gpu:0.1.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        consumer["spec"]["template"]["spec"]["tolerations"]
    assert "replicas" not in consumer["spec"], "KEDA owns the consumer's replicas"
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == consumer["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka" and trigger["metadata"]["topic"] == "alerts"
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    monitor = one(docs, "ServiceMonitor")
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    services = [d for d in docs if d["kind"] == "Service"]
    assert ports == {p["name"] for s in services for p in s["spec"]["ports"]}
    for service in services:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_consumer_replicas_never_exceed_the_partitions():
    docs = render({"kafka": {"inputTopicPartitions": 4},
                   "consumer": {"autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 10}}}})
    assert one(docs, "ScaledObject")["spec"]["maxReplicaCount"] == 4
    docs = render({"kafka": {"inputTopicPartitions": 2},
                   "consumer": {"autoscaling": {"hpa": {"enabled": True, "maxReplicas": 8}}}})
    assert one(docs, "HorizontalPodAutoscaler", "-consumer")["spec"]["maxReplicas"] == 2
    with pytest.raises(helm.HelmError, match="inputTopicPartitions"):
        render({"kafka": {"inputTopicPartitions": 3}, "consumer": {"replicas": 5}})
    with pytest.raises(helm.HelmError, match="not both"):
        render({"consumer": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}})


@pytest.mark.parametrize("values, message", [
    ({"kafka": {"sasl": {"mechanism": "SCRAM-SHA-512"}}}, "existingSecret"),
    ({"kafka": {"sasl": {"mechanism": "GSSAPI", "existingSecret": "x"}}}, "mechanism"),
    ({"kafka": {"securityProtocol": "TLS"}}, "securityProtocol"),
])
def test_bad_security_values_fail_with_a_message(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_secrets_are_referenced_never_stored():
    docs = render(merged(ALL_ON, SECURED))
    assert_kubernetes_objects(docs)
    assert "Secret" not in kinds(docs)
    consumer = container(one(docs, "Deployment", "-consumer"))
    env = {e["name"]: e for e in consumer["env"]}
    assert env["RBSTREAM_KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "survey-sasl", "key": "username"}
    assert env["RBSTREAM_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "survey-sasl", "key": "password"}
    volumes = {v["name"]: v for v in one(docs, "Deployment", "-consumer")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-tls"]["secret"]["secretName"] == "survey-tls"
    api_deployment = one(docs, "Deployment", "-api")
    api_env = {e["name"]: e.get("value") for e in container(api_deployment)["env"]}
    assert api_env["RBSTREAM_API_TOKEN_FILE"] == "/etc/rbstream/api-token/token"
    api_volumes = {v["name"]: v for v in api_deployment["spec"]["template"]["spec"]["volumes"]}
    assert api_volumes["api-token"]["secret"]["secretName"] == "rb-api-token"
    auth = one(docs, "TriggerAuthentication")
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password", "ca", "cert", "key"}
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"


# -- the rendered settings, read by the real consumer code --------------------------------------------


def consumer_settings(docs: list[dict], tmp_path: Path, secret_values: dict[str, str]) -> dict:
    """Resolve the rendered ConfigMap + env exactly as ``rbstream consume`` in the pod would."""
    from service.stream.consumer import CONSUME_OPTIONS
    from service.settings import add_options, resolve

    config = one(docs, "ConfigMap", "-config")["data"]["consumer.toml"]
    tomllib.loads(config)  # valid TOML, or this raises
    path = tmp_path / "consumer.toml"
    path.write_text(config)
    c = container(one(docs, "Deployment", "-consumer"))
    environ = {}
    for var in c["env"]:
        if "value" in var:
            environ[var["name"]] = var["value"].replace("/etc/rbstream/consumer.toml", str(path))
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            environ[var["name"]] = secret_values[ref["key"]]
    parser = argparse.ArgumentParser()
    add_options(parser, CONSUME_OPTIONS)
    return resolve(parser.parse_args([]), CONSUME_OPTIONS, environ=environ)


def librdkafka_accepts(settings: dict) -> None:
    """Build the consumer's and producer's configs with the consumer's own code and let librdkafka check them."""
    from confluent_kafka import Consumer, Producer

    from service.stream.consumer import AlertConsumer

    loop = AlertConsumer(settings, scorers={})
    Consumer(loop.consumer_config()).close()
    Producer(loop.producer_config()).flush(0)


def test_rendered_settings_are_the_consumers_options(tmp_path):
    settings = consumer_settings(render(ALL_ON), tmp_path, {})
    assert settings["input_topic"] == "alerts" and settings["output_topic"] == "scores"
    assert settings["dlq_topic"] == "alerts-dlq" and settings["group_id"] == "rbstream"
    assert settings["batch_size"] == 256 and settings["max_wait_ms"] == 100
    assert settings["metrics_port"] == 9108 and settings["device"] == "cuda"
    assert settings["from_beginning"] is False
    assert settings["kafka"] == {"security.protocol": "PLAINTEXT"}
    librdkafka_accepts(settings)
    assert consumer_settings(render(), tmp_path, {})["device"] == "cpu"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"])
def test_sasl_settings_reach_librdkafka(tmp_path, mechanism):
    values = {"kafka": {"securityProtocol": "SASL_SSL", "bootstrapServers": "127.0.0.1:1",
                        "sasl": {"mechanism": mechanism, "existingSecret": "survey-sasl",
                                 # loopback and closed: librdkafka's OIDC thread fails fast, nothing leaves the host
                                 "oauthbearer": {"tokenEndpointUrl": "http://127.0.0.1:9/token"}}}}
    secrets = {"username": "alice", "password": "s3cret", "client-id": "rb", "client-secret": "oauth-s3cret"}
    settings = consumer_settings(render(values), tmp_path, secrets)
    kafka = settings["kafka"]
    assert kafka["security.protocol"] == "SASL_SSL" and kafka["sasl.mechanism"] == mechanism
    if mechanism == "OAUTHBEARER":
        assert kafka["sasl.oauthbearer.client.id"] == "rb"
        assert kafka["sasl.oauthbearer.client.secret"] == "oauth-s3cret"
        assert kafka["sasl.oauthbearer.token.endpoint.url"] == "http://127.0.0.1:9/token"
    else:
        assert (kafka["sasl.username"], kafka["sasl.password"]) == ("alice", "s3cret")
    librdkafka_accepts(settings)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test CA and client certificate")
def test_tls_client_certificate_settings_reach_librdkafka(tmp_path):
    tls = tmp_path / "kafka-tls"
    tls.mkdir()
    for args in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                  "-keyout", "ca.key", "-out", "ca.crt"],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rbstream", "-keyout", "tls.key", "-out", "tls.csr"],
                 ["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
                  "-out", "tls.crt"]):
        subprocess.run(["openssl", *args], cwd=tls, check=True, capture_output=True, timeout=60)
    values = merged(SECURED, {"kafka": {"bootstrapServers": "127.0.0.1:1"}})
    docs = render(values)
    settings = consumer_settings(docs, tmp_path, {"username": "alice", "password": "s3cret"})
    mount = next(m for m in container(one(docs, "Deployment", "-consumer"))["volumeMounts"] if m["name"] == "kafka-tls")
    kafka = settings["kafka"]
    for key in ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location"):
        assert kafka[key].startswith(mount["mountPath"] + "/")
        kafka[key] = str(tls / Path(kafka[key]).name)  # the Secret's files, where the pod would see them
    librdkafka_accepts(settings)
    kafka["ssl.ca.location"] = str(tls / "missing.crt")
    with pytest.raises(Exception, match="ssl.ca.location"):
        librdkafka_accepts(settings)


# -- dashboard and rules: one copy, packaged ----------------------------------------------------------


def test_dashboard_configmap_is_the_canonical_dashboard_for_the_sidecar():
    config_map = one(render(), "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["rbstream.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_prometheusrule_is_the_rules_file_with_thresholds_from_values():
    rules_file = yaml.safe_load((CHART / "files" / "alert-rules.yaml").read_text())
    rule = one(render(ALL_ON), "PrometheusRule")
    assert rule["spec"]["groups"] == rules_file["groups"], "defaults: the PrometheusRule is the file"
    thresholds = {"failureRatio": 0.2, "scoreMedianShift": 0.3, "scoreShiftMinAlerts": 50, "lagMinMessages": 7,
                  "driftPsi": 0.4, "driftKs": 0.3, "shareRealChange": 0.1, "undecodableShare": 0.02,
                  "monitorMinAlerts": 300}
    rule = one(render(merged(ALL_ON, {"metrics": {"prometheusRule": {"thresholds": thresholds}}})), "PrometheusRule")
    recorded = {r["record"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r}
    assert recorded == {"rbstream:threshold:failure_ratio": "vector(0.2)",
                        "rbstream:threshold:score_median_shift": "vector(0.3)",
                        "rbstream:threshold:score_shift_min_alerts": "vector(50)",
                        "rbstream:threshold:lag_min_messages": "vector(7)",
                        "rbstream:threshold:drift_psi": "vector(0.4)",
                        "rbstream:threshold:drift_ks": "vector(0.3)",
                        "rbstream:threshold:share_real_change": "vector(0.1)",
                        "rbstream:threshold:undecodable_share": "vector(0.02)",
                        "rbstream:threshold:monitor_min_alerts": "vector(300)"}
    assert [g for g in rule["spec"]["groups"] if g["name"] != "rbstream.thresholds"] == \
        [g for g in rules_file["groups"] if g["name"] != "rbstream.thresholds"]


# -- values.yaml: everything used exists, everything there is documented --------------------------------


def _values_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _values_paths(value, prefix + (key,))


def test_every_value_a_template_uses_exists_in_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = set(_values_paths(values))
    used = set()
    for template in (CHART / "templates").glob("*"):
        for match in re.finditer(r"\.Values((?:\.\w+)+)", template.read_text()):
            used.add((template.name, tuple(match.group(1).strip(".").split("."))))
    assert used, "the templates use no values?"
    missing = sorted(f"{name}: .Values.{'.'.join(path)}" for name, path in used if path not in known)
    assert missing == []


def test_values_yaml_documents_every_value():
    """Each leaf value (or the block it belongs to) has a ``# --`` comment right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def documented(line_no: int) -> bool:
        i = line_no - 1
        while i >= 0 and lines[i].strip().startswith("#"):
            if lines[i].strip().startswith("# --"):
                return True
            i -= 1
        return False

    undocumented = []

    def walk(node: yaml.MappingNode, path: tuple) -> None:
        for key_node, value_node in node.value:
            here = path + (key_node.value,)
            if documented(key_node.start_mark.line):
                continue
            if isinstance(value_node, yaml.MappingNode) and value_node.value:
                walk(value_node, here)  # a section: its values carry the docs
            else:
                undocumented.append(".".join(here))

    walk(yaml.compose((CHART / "values.yaml").read_text()), ())
    assert undocumented == []


# -- the rendered consumer, running --------------------------------------------------------------------


@pytest.mark.kafka
def test_rendered_consumer_config_runs_a_real_consumer_with_its_probes(broker, tmp_path):
    """The chart's ConfigMap and container args boot ``rbstream consume`` on a real broker: the
    probes the chart declares answer on the metrics port, the container health check passes, the
    sample alerts are scored and counted on ``/metrics``, and SIGTERM stops it cleanly."""
    import os
    import signal
    import sys
    import urllib.request

    from conftest import rubin_files, ztf_files, ztf_jpeg_files
    from prometheus_client.parser import text_string_to_metric_families
    from service.tools import replay
    from service.tools.broker import free_port
    from streaming import create_topic, unique, wait_for

    port = free_port()
    topics = {"inputTopic": unique("alerts"), "outputTopic": unique("scores"), "dlqTopic": unique("dlq"),
              "groupId": unique("group")}
    create_topic(broker.bootstrap_servers, topics["inputTopic"], partitions=1)
    docs = render({"kafka": {"bootstrapServers": broker.bootstrap_servers, **topics,
                             "extraOptions": {"consumer.session.timeout.ms": "6000"}},
                   "consumer": {"metricsPort": port, "fromBeginning": True, "batchSize": 8, "maxWaitMs": 50}})
    config = tmp_path / "consumer.toml"
    config.write_text(one(docs, "ConfigMap", "-config")["data"]["consumer.toml"])
    c = container(one(docs, "Deployment", "-consumer"))
    env = {**os.environ, **{v["name"]: v["value"] for v in c["env"] if "value" in v}, "RBSTREAM_CONFIG": str(config)}
    log = tmp_path / "consumer.log"
    process = subprocess.Popen([sys.executable, "-m", "service.cli", *c["args"]], cwd=REPO, env=env,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except OSError:
            return 0, ""

    def counted(metric: str) -> float:
        families = text_string_to_metric_families(get("/metrics")[1])
        return sum(s.value for f in families for s in f.samples if s.name == metric)

    try:
        wait_for(lambda: get("/metrics")[0] == 200 or process.poll() is not None, timeout=60, what="/metrics")
        assert process.poll() is None, log.read_text()[-3000:]
        assert get(c["livenessProbe"]["httpGet"]["path"])[0] == 200
        # Readiness may wait for the broker and the group's assignment.
        wait_for(lambda: get(c["readinessProbe"]["httpGet"]["path"])[0] == 200, timeout=30, what="readiness")
        health = subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py")], capture_output=True,
                                env={**os.environ, "RBSTREAM_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/metrics"},
                                timeout=30)
        assert health.returncode == 0, health.stderr
        replay.replay({"bootstrap_servers": broker.bootstrap_servers, "kafka": {}}, topics["inputTopic"],
                      replay.load_messages(ztf_files() + rubin_files()), progress=False)
        decodable = len(ztf_files()) - len(ztf_jpeg_files()) + len(rubin_files())
        wait_for(lambda: counted("rbstream_alerts_scored_total") >= decodable, timeout=90, what="the scores")
        assert counted("rbstream_alerts_failed_total") == len(ztf_jpeg_files())
        assert counted("rbstream_alerts_consumed_total") == len(ztf_files()) + len(rubin_files())
        assert counted("rbstream_model_info") == 2  # ztf and rubin
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_rendered_api_runs_with_its_probes_and_token_file(tmp_path):
    """The chart's API container (args, env, the token Secret as a file) serves the real API: the
    probes and /metrics are open, /model needs the bearer token from the mounted file."""
    import os
    import sys
    import urllib.error
    import urllib.request

    from service.tools.broker import free_port
    from streaming import wait_for

    port = free_port()
    docs = render(merged(SECURED, {"api": {"port": port}}))
    deployment = one(docs, "Deployment", "-api")
    c = container(deployment)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "api-token"]
    secret_dir = tmp_path / "api-token"  # where the kubelet would project Secret rb-api-token
    secret_dir.mkdir()
    token = "t0ken-from-the-secret"
    env = {**os.environ}
    env.pop("RBSTREAM_API_TOKEN", None)
    for var in c["env"]:
        env[var["name"]] = var["value"].replace(mount["mountPath"], str(secret_dir))
    (secret_dir / Path(env["RBSTREAM_API_TOKEN_FILE"]).name).write_text(token + "\n")
    # The pod listens on all its interfaces; here, loopback is enough.
    args = ["127.0.0.1" if a == "0.0.0.0" else a for a in c["args"]]
    log = tmp_path / "api.log"
    process = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def status(path: str, bearer: str | None = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if bearer:
            request.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    try:
        wait_for(lambda: status("/healthz") == 200 or process.poll() is not None, timeout=60, what="/healthz")
        assert process.poll() is None, log.read_text()[-3000:]
        assert status(c["livenessProbe"]["httpGet"]["path"]) == 200
        assert status(c["readinessProbe"]["httpGet"]["path"]) == 200
        assert status("/metrics") == 200
        assert status("/model") == 401
        assert status("/model", bearer="wrong") == 401
        assert status("/model", bearer=token) == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
