"""camserve as the ML backend of a real Label Studio server (label-studio from PyPI, tests/label_studio/requirements.txt).

Starts Label Studio on loopback with its own data folder, creates a project through its API whose config names its
own tags and five ImageNet labels (mapped to the model's classes by name, `predicted_values`, `alias` and
camserve's `[label_studio.labels]`), imports tasks (http URLs from a local file server, an https URL from a local TLS
server whose CA the test makes, an uploaded file, and one image that cannot be fetched), connects the real camserve
binary as the project's model, runs "Retrieve predictions" as the Data Manager's action does, and reads the stored
predictions back through Label Studio's API. The images are tests/fixtures/localization, whose objects' boxes are
known (cases.json) and whose Grad-CAM box IoUs are pinned (expected.json).
"""

import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from camserve import FIXTURES, ORT, ROOT, serve_directory, start  # noqa: E402

LOCALIZATION = FIXTURES / "localization"
CASES = {case["file"]: case for case in json.loads((LOCALIZATION / "cases.json").read_text())}
EXPECTED_IOU = json.loads((LOCALIZATION / "expected.json").read_text())
TOKEN = "camserve0test0token0000000000000000000000"
BIG_BATCH = 2000

# Five ImageNet labels under the project's own names: by the class name itself, through camserve's
# [label_studio.labels] (Coffee), `predicted_values` (Rocket) and an `alias` that is the class name (tripod).
LABELS = """
    <Label value="Egyptian cat"/>
    <Label value="Coffee"/>
    <Label value="Rocket" predicted_values="space shuttle"/>
    <Label value="football helmet"/>
    <Label value="Tripod stand" alias="tripod"/>"""
LABEL_CONFIG = f"""<View>
  <Image name="photo" value="$picture"/>
  <RectangleLabels name="where" toName="photo">{LABELS}
  </RectangleLabels>
  <BrushLabels name="paint" toName="photo">{LABELS}
  </BrushLabels>
</View>"""
# The label each fixture's class is stored under.
PROJECT_LABEL = {
    "Egyptian cat": "Egyptian cat",
    "espresso": "Coffee",
    "space shuttle": "Rocket",
    "football helmet": "football helmet",
    "tripod": "tripod",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca(folder: Path):
    """A CA and a certificate for 127.0.0.1 signed by it: (ca.pem, server ssl context)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "camserve test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    return folder / "ca.pem", context


class LabelStudio:
    """The real server, on loopback, with a data folder of its own and a user whose legacy API token is TOKEN."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(
            os.environ,
            # What Label Studio must allow for a backend and task images on loopback or a private network.
            ML_BLOCK_LOCAL_IP="false",
            SSRF_PROTECTION_ENABLED="false",
            # The token it sends to /setup, with which camserve fetches uploads, is the legacy kind.
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            # It waits 100 s for a predict by default; the big batch takes longer on a debug build.
            ML_TIMEOUT_PREDICT="600",
            LABEL_STUDIO_HOST=self.url,
            LABEL_STUDIO_USERNAME="camserve@example.com",
            LABEL_STUDIO_PASSWORD="camserve-test-password",
            LABEL_STUDIO_USER_TOKEN=TOKEN,
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            DJANGO_DB="sqlite",
        )
        label_studio = Path(sys.executable).parent / "label-studio"
        self.log = open(folder / "label-studio.log", "w")
        self.process = subprocess.Popen(
            [str(label_studio), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(folder / "data")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=folder,
        )
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {TOKEN}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (folder / "label-studio.log").read_text()[-3000:]
            try:
                if self.session.get(f"{self.url}/api/projects", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        pytest.fail("Label Studio did not start in 240 s")

    def api(self, method, path, timeout=300, **kwargs):
        response = self.session.request(method, f"{self.url}{path}", timeout=timeout, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:2000]}"
        return response.json() if response.content else None

    def project(self, title):
        return self.api("POST", "/api/projects", json={"title": title, "label_config": LABEL_CONFIG})["id"]

    def connect(self, project, backend_url):
        return self.api("POST", "/api/ml", json={"project": project, "url": backend_url, "title": "camserve"})

    def retrieve_predictions(self, project):
        """What the Data Manager's "Retrieve predictions" action sends, on every task."""
        return self.api(
            "POST",
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
            json={"selectedItems": {"all": True, "excluded": []}},
            timeout=900,
        )

    def tasks(self, project):
        tasks, page = [], 1
        while True:
            answer = self.api("GET", f"/api/tasks?project={project}&fields=all&page={page}&page_size=500")
            tasks.extend(answer["tasks"])
            if len(tasks) >= answer["total"]:
                return tasks
            page += 1

    def predictions(self, task_id):
        return self.api("GET", f"/api/predictions?task={task_id}")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="camserve-ls-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def label_studio(folder):
    server = LabelStudio(folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hosts(folder):
    """The fixture images over http, and over https with a certificate from the test's own CA."""
    images = folder / "images"
    images.mkdir()
    for name in CASES:
        shutil.copy(LOCALIZATION / name, images / name)
    shutil.copy(FIXTURES / "images" / "chelsea_64.png", images / "chelsea_64.png")
    ca_file, tls = make_ca(folder)
    with serve_directory(images) as http_host, serve_directory(images, tls) as https_host:
        yield {"http": http_host, "https": https_host, "ca_file": ca_file}


def camserve_config(folder: Path, label_studio, hosts, name):
    """A config in a folder of its own that names the test CA by a relative path: resolved against that folder."""
    config_dir = folder / name
    config_dir.mkdir()
    shutil.copy(hosts["ca_file"], config_dir / "test-ca.pem")
    config = f"""
[server]
request_timeout_secs = 5   # Label Studio's predict sizes its own budget to the batch
[runtime]
library = "{ORT}"
[[models]]
name = "efficientnet_lite0"
file = "{ROOT / 'models' / 'efficientnet_lite0.onnx'}"
threads = 2
[label_studio]
model = "efficientnet_lite0"
url = "{label_studio.url}"
allowed_hosts = ["{hosts['http']}", "{hosts['https']}"]
ca_file = "test-ca.pem"
[label_studio.labels]
Coffee = ["espresso"]
"""
    (config_dir / "camserve.toml").write_text(config)
    return config_dir / "camserve.toml"


@pytest.fixture(scope="module")
def camserve(folder, label_studio, hosts):
    with start(camserve_config(folder, label_studio, hosts, "camserve")) as server:
        yield server


def metric(camserve, name):
    text = requests.get(f"{camserve.url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def iou(a, b):
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def project(label_studio, camserve, hosts):
    """The labeled project: every kind of task, predictions retrieved once."""
    project = label_studio.project("camserve: where the model looked")
    names = sorted(CASES)
    uploaded, https = "cat_texture_0.35.jpg", "shuttle_texture_0.75.jpg"
    tasks = [
        {"data": {"picture": f"http://{hosts['http']}/{name}", "file": name}}
        for name in names
        if name not in (uploaded, https)
    ]
    tasks.append({"data": {"picture": f"https://{hosts['https']}/{https}", "file": https}})
    tasks.append({"data": {"picture": f"http://{hosts['http']}/no-such-image.jpg", "file": None}})
    label_studio.api("POST", f"/api/projects/{project}/import", json=tasks)
    with open(LOCALIZATION / uploaded, "rb") as f:
        label_studio.api("POST", f"/api/projects/{project}/import", files={uploaded: (uploaded, f, "image/jpeg")})

    backend = label_studio.connect(project, f"{camserve.url}/label-studio")
    assert backend["state"] == "CO", backend
    label_studio.retrieve_predictions(project)
    return {"id": project, "backend": backend, "tasks": label_studio.tasks(project)}


def case_of(task):
    picture = task["data"]["picture"]
    if picture.startswith("/data/upload/"):
        return CASES["cat_texture_0.35.jpg"]
    return CASES.get(task["data"].get("file"))


def test_the_upload_is_a_label_studio_path(project):
    uploads = [t["data"]["picture"] for t in project["tasks"] if t["data"]["picture"].startswith("/data/upload/")]
    assert len(uploads) == 1, [t["data"] for t in project["tasks"]]


def test_every_task_has_a_prediction_of_the_projects_labels_over_the_object(label_studio, project):
    interface = LabelInterface(LABEL_CONFIG)
    seen = set()
    for task in project["tasks"]:
        case = case_of(task)
        [prediction] = label_studio.predictions(task["id"])
        if case is None:
            continue
        result = prediction["result"]
        assert interface.validate_prediction({"result": result}, return_errors=True) == []
        [box] = [r for r in result if r["type"] == "rectanglelabels"]
        [brush] = [r for r in result if r["type"] == "brushlabels"]
        expected_label = PROJECT_LABEL[case["label"]]
        assert box["value"]["rectanglelabels"] == [expected_label], (case["file"], prediction)
        assert brush["value"]["brushlabels"] == [expected_label], case["file"]
        assert (box["from_name"], box["to_name"], brush["from_name"]) == ("where", "photo", "paint")

        width, height = Image.open(LOCALIZATION / case["file"]).size
        assert (box["original_width"], box["original_height"]) == (width, height)
        v = box["value"]
        found = [v["x"] * width / 100, v["y"] * height / 100, (v["x"] + v["width"]) * width / 100,
                 (v["y"] + v["height"]) * height / 100]
        # Over the object: as good as camserve's localization study measured for this image at the same threshold.
        assert iou(found, case["box"]) >= EXPECTED_IOU[case["file"]]["default"] - 0.05, (case, found)

        # Label Studio's own brush decoder: a mask of the image's size, inside which the box's region lies.
        mask = decode_rle(brush["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        x0, y0, x1, y1 = (round(c) for c in found)
        assert xs.min() <= x0 + 1 and xs.max() >= x1 - 2 and ys.min() <= y0 + 1 and ys.max() >= y1 - 2, case
        seen.add(case["file"])
    assert seen == set(CASES), "the upload and the https task were predicted too"


def test_a_task_whose_image_cannot_be_fetched_gets_an_empty_prediction(label_studio, camserve, project):
    [task] = [t for t in project["tasks"] if "no-such-image" in t["data"]["picture"]]
    [prediction] = label_studio.predictions(task["id"])
    assert prediction["result"] == []
    assert metric(camserve, 'camserve_label_studio_task_errors_total{code="image_fetch_failed"}') == 1
    assert any("task not predicted" in line and "404" in line for line in camserve.log), "".join(camserve.log)


def test_start_training_and_versions_leave_the_backend_connected(label_studio, camserve, project):
    backend = project["backend"]["id"]
    label_studio.api("POST", f"/api/ml/{backend}/train")
    assert metric(camserve, 'camserve_requests_total{route="/label-studio/webhook",model="",status="200"}') == 1
    assert label_studio.api("GET", f"/api/ml/{backend}")["state"] == "CO"
    versions = label_studio.api("GET", f"/api/ml/{backend}/versions")
    assert versions["versions"] == ["camserve-efficientnet_lite0"], versions


def test_a_big_batch_is_stored_in_full(label_studio, camserve, hosts):
    project = label_studio.project("camserve: a big batch")
    url = f"http://{hosts['http']}/chelsea_64.png"
    label_studio.api("POST", f"/api/projects/{project}/import", json=[{"picture": url}] * BIG_BATCH)
    label_studio.connect(project, f"{camserve.url}/label-studio")
    started = time.monotonic()
    label_studio.retrieve_predictions(project)
    elapsed = time.monotonic() - started
    served = [line for line in camserve.log if "route=/label-studio/predict" in line and "served" in line]
    tasks = label_studio.tasks(project)
    assert len(tasks) == BIG_BATCH
    counts = [len(t["predictions"]) for t in tasks]
    assert counts == [1] * BIG_BATCH
    labels = {r["value"]["rectanglelabels"][0] for t in tasks for r in t["predictions"][0]["result"]
              if r["type"] == "rectanglelabels"}
    assert labels == {"Egyptian cat"}, labels
    print(f"\n{BIG_BATCH} tasks predicted and stored in {elapsed:.1f} s; camserve: {served[-1].strip()}")


def test_uploads_with_a_personal_access_token_when_legacy_tokens_are_off(label_studio, folder, hosts):
    """Label Studio's default: legacy tokens off, so the token it sends to /setup is refused; camserve fetches
    uploads with a personal access token given as CAMSERVE_LABEL_STUDIO_API_KEY. Runs last: it turns the test's own
    legacy token off."""
    pat = label_studio.api("POST", "/api/token/")["token"]
    access = label_studio.api("POST", "/api/token/refresh/", json={"refresh": pat})["access"]
    label_studio.session.headers["Authorization"] = f"Bearer {access}"
    label_studio.api("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
    project = label_studio.project("camserve: personal access token")
    name = "cat_plain_0.55.jpg"
    with open(LOCALIZATION / name, "rb") as f:
        label_studio.api("POST", f"/api/projects/{project}/import", files={name: (name, f, "image/jpeg")})
    config = camserve_config(folder, label_studio, hosts, "camserve-pat")
    with start(config, env={"CAMSERVE_LABEL_STUDIO_API_KEY": pat}) as camserve:
        label_studio.connect(project, f"{camserve.url}/label-studio")
        label_studio.retrieve_predictions(project)
        [task] = label_studio.tasks(project)
        assert task["data"]["picture"].startswith("/data/upload/")
        [prediction] = label_studio.predictions(task["id"])
        labels = {r["value"]["rectanglelabels"][0] for r in prediction["result"] if r["type"] == "rectanglelabels"}
        assert labels == {"Egyptian cat"}, prediction
