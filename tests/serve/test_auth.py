import pytest

from orthovision.config import SecurityConfig, ServeConfig, TenantConfig
from serve.auth import (
    Authenticator,
    AuthError,
    Forbidden,
    QuotaExceeded,
    RateLimited,
    check_startup,
    hash_key,
    is_loopback,
    tenants_from_env,
)


def tenant(tid: str, key: str, **kw) -> TenantConfig:
    return TenantConfig(id=tid, key_sha256=hash_key(key), **kw)


def auth(*tenants: TenantConfig) -> Authenticator:
    return Authenticator(SecurityConfig(auth="api-key", tenants=tenants), list(tenants))


@pytest.mark.parametrize(
    ("key", "scope", "error"),
    [
        (None, "predict", AuthError),
        ("", "predict", AuthError),
        ("wrong", "predict", AuthError),
        ("k-read", "predict", Forbidden),
        ("k-read", "batch", Forbidden),
    ],
)
def test_rejections(key, scope, error):
    a = auth(tenant("hosp", "k-all"), tenant("reader", "k-read", scopes=("read",)))
    with pytest.raises(error) as exc:
        a.authenticate(key, scope)
    assert exc.value.http_status == (403 if error is Forbidden else 401)
    assert "k-" not in exc.value.message  # never echo a key


def test_valid_key_returns_tenant_and_keys_are_only_hashed():
    a = auth(tenant("hosp", "secret-key"))
    assert a.authenticate("secret-key", "predict") == "hosp"
    assert "secret-key" not in repr(vars(a))


def test_token_bucket_429_with_retry_after():
    a = auth(tenant("hosp", "k", rate_per_s=0.5, burst=2))
    a.authenticate("k", "predict")
    a.authenticate("k", "predict")
    with pytest.raises(RateLimited) as exc:
        a.authenticate("k", "predict")
    assert exc.value.http_status == 429 and exc.value.retry_after_s >= 1


def test_daily_quota():
    a = auth(tenant("hosp", "k", daily_quota=2, rate_per_s=100, burst=100))
    a.authenticate("k", "predict")
    a.authenticate("k", "predict")
    with pytest.raises(QuotaExceeded) as exc:
        a.authenticate("k", "predict")
    assert exc.value.retry_after_s > 0


def test_auth_off_means_local_tenant():
    a = Authenticator(SecurityConfig(auth="none"), [])
    assert a.authenticate(None, "predict") == "local"


def test_env_keys_are_hashed_and_get_defaults():
    tenants = tenants_from_env("hosp-a=key1, hosp-b=key2", SecurityConfig().default_tenant)
    assert [t.id for t in tenants] == ["hosp-a", "hosp-b"]
    assert tenants[0].key_sha256 == hash_key("key1")
    with pytest.raises(ValueError):
        tenants_from_env("no-equals-sign")


@pytest.mark.parametrize(
    ("host", "auth_mode", "tenants", "ok"),
    [
        ("127.0.0.1", "none", 0, True),
        ("localhost", "none", 0, True),
        ("::1", "none", 0, True),
        ("0.0.0.0", "none", 0, False),
        ("10.1.2.3", "none", 0, False),
        ("0.0.0.0", "api-key", 0, False),
        ("0.0.0.0", "api-key", 1, True),
    ],
)
def test_startup_refuses_unsafe(host, auth_mode, tenants, ok):
    cfg = ServeConfig(host=host, security={"auth": auth_mode})
    ts = [tenant("hosp", "k")] * tenants
    if ok:
        check_startup(cfg, ts)
    else:
        with pytest.raises(RuntimeError, match="refusing to start"):
            check_startup(cfg, ts)


def test_is_loopback():
    assert is_loopback("127.0.0.5") and not is_loopback("example.org")


def test_tenant_id_is_a_bounded_label():
    with pytest.raises(ValueError):
        TenantConfig(id="Hospital With Spaces And A Very Long Name", key_sha256="0" * 64)


def test_every_scope_is_required():
    a = auth(tenant("viewer", "k-read", scopes=("read", "explain")))
    assert a.authenticate("k-read", "read", "explain") == "viewer"
    with pytest.raises(Forbidden):
        a.authenticate("k-read", "predict", "explain")


def test_wrong_keys_from_one_client_get_429_after_a_burst():
    from serve.auth import BAD_KEY_BURST

    a = auth(tenant("hosp", "k-all"))
    for _ in range(int(BAD_KEY_BURST)):
        with pytest.raises(AuthError) as exc:
            a.authenticate("guess", "predict", client="10.0.0.9")
        assert exc.value.http_status == 401
    with pytest.raises(RateLimited) as exc:
        a.authenticate("guess", "predict", client="10.0.0.9")
    assert exc.value.http_status == 429 and exc.value.retry_after_s >= 1
    # Another client and the right key are unaffected.
    with pytest.raises(AuthError) as exc:
        a.authenticate("guess", "predict", client="10.0.0.10")
    assert exc.value.http_status == 401
    assert a.authenticate("k-all", "predict", client="10.0.0.9") == "hosp"
