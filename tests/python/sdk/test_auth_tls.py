"""The SDK against an mboxd with TLS and tokens: token and CA as arguments and
from MBOX_TOKEN / MBOX_TLS_CA, what mboxd refuses (no token, a token outside its
namespace, plain text) and how the SDK reports it."""

import grpc
import pytest

import mbox
import mbox.client
from harness import Mboxd, make_test_pki

WRITER = "sdk-writer-5e1f"
CV_ONLY = "sdk-cv-only-0b7a"


@pytest.fixture
def secured(tmp_path):
    """mboxd with TLS and tokens; loopback is not exempt, so tokens count here too."""
    pki = make_test_pki(tmp_path / "pki")
    config = tmp_path / "mboxd.toml"
    config.write_text(f"""
[tls]
cert_file = "{pki['server.crt']}"
key_file = "{pki['server.key']}"
[auth]
enabled = true
allow_unauthenticated_loopback = false
[[auth.tokens]]
name = "writer"
token = "{WRITER}"
scopes = ["write", "read"]
namespaces = ["*"]
[[auth.tokens]]
name = "cv"
token = "{CV_ONLY}"
scopes = ["write", "read"]
namespaces = ["cv"]
""")
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca.crt"].read_bytes())
    server = Mboxd(tmp_path / "data", ["--config", str(config), "--roll-max-age-ms", "200"], credentials=credentials)
    server.ca = pki["ca.crt"]
    yield server
    assert server.stop() == 0


def code_of(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_token_and_ca_as_arguments(secured):
    client = mbox.Client(secured.addr, token=WRITER, tls=str(secured.ca))
    exp = client.new_experiment("tls-run", owner="me", namespace="nlp", metadata={"lr": 0.1})
    exp.log_metrics({"loss": 0.5}, step=1)
    exp.log_metrics({"loss": 0.25}, step=2)
    client.flush(timeout=30)
    series = exp.metrics(["loss"])["loss"]
    assert list(series.steps) == [1, 2] and list(series.values) == [0.5, 0.25]
    assert client.experiment(exp.id).name == "tls-run"
    assert exp.metadata() == {"lr": 0.1}
    client.close(timeout=10)

    # mbox.TLS with the CA as PEM bytes, and the same token.
    client = mbox.Client(secured.addr, token=WRITER, tls=mbox.TLS(ca=secured.ca.read_bytes()))
    assert [e.name for e in client.experiments("nlp")] == ["tls-run"]
    client.close(timeout=10)


def test_what_mboxd_refuses(secured):
    ca = str(secured.ca)
    nobody = mbox.Client(secured.addr, tls=ca)
    code, details = code_of(lambda: nobody.new_experiment("x", namespace="cv"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token is required" in details
    nobody.close(timeout=5)

    cv = mbox.Client(secured.addr, token=CV_ONLY, tls=ca)
    code, details = code_of(lambda: cv.new_experiment("x", namespace="nlp"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and details == "token may not write namespace nlp"
    mine = cv.new_experiment("mine", namespace="cv")
    assert mine.namespace == "cv"

    # Logging into another namespace's run: the batch is refused for good, and
    # flush says so.
    writer = mbox.Client(secured.addr, token=WRITER, tls=ca)
    theirs = writer.new_experiment("theirs", namespace="nlp")
    cv.log_metrics(theirs.id, {"loss": 1.0}, step=0)
    with pytest.raises(mbox.DeliveryError) as e:
        cv.flush(timeout=30)
    assert "PERMISSION_DENIED" in str(e.value) and "namespace nlp" in str(e.value)
    cv.close(timeout=5)
    writer.close(timeout=5)

    # A plain-text client gets no answer from a TLS port.
    plain = mbox.Client(secured.addr, token=WRITER, tls=False, request_timeout_s=3)
    code, _ = code_of(lambda: plain.new_experiment("x", namespace="cv"))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    plain.close(timeout=5)


def test_token_and_ca_from_the_environment(secured, monkeypatch, default_client_at):
    monkeypatch.setenv("MBOX_TOKEN", WRITER)
    monkeypatch.setenv("MBOX_TLS_CA", str(secured.ca))
    default_client_at(secured.addr)
    exp = mbox.new_experiment("env-run", namespace="cv")
    exp.log_metrics({"acc": 0.9}, step=3)
    mbox.flush(timeout=30)
    assert list(exp.metrics(["acc"])["acc"].steps) == [3]
    assert [e.name for e in mbox.search(namespace="cv")] == ["env-run"]
    # An argument wins over the environment.
    code, _ = code_of(lambda: mbox.Client(secured.addr, token="wrong").experiments("cv"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_tls_settings_are_checked():
    with pytest.raises(ValueError):
        mbox.TLS(cert="client.crt")
    with pytest.raises(TypeError):
        mbox.Client("localhost:1", tls=3)
    assert mbox.Client("localhost:1", tls=False).tls is None


def test_lightning_logger_passes_token_and_tls_through(secured):
    pytest.importorskip("lightning", reason="lightning is not installed: pip install 'mbox[lightning]'")
    from mbox.lightning import MboxLogger

    logger = MboxLogger(name="lit", namespace="cv", addr=secured.addr, token=WRITER, tls=str(secured.ca))
    logger.log_hyperparams({"lr": 0.3})
    logger.log_metrics({"loss": 1.5}, step=4)
    logger.save()
    exp = logger.experiment
    assert exp.metadata() == {"lr": 0.3}
    assert list(exp.metrics(["loss"])["loss"].steps) == [4]
    exp.client.close(timeout=10)
