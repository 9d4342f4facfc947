"""pytest fixture `hub_server`: a local Hub (tests/hub_server.py) wired into `huggingface_hub` for one test.

Import it into a test module with `from hub_fixtures import hub_server`.

`huggingface_hub` reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_DISABLE_XET, ... once, at import, into
`huggingface_hub.constants` (and builds a module-level `HfApi` with the endpoint of that moment). So the
fixture does both:
- sets the environment variables (monkeypatched), which is all a fresh subprocess needs: subprocess checks
  are the most faithful, since the client then configures itself exactly as it would for a user;
- patches the already-imported constants (and the module-level `HfApi`), so in-process calls such as
  `snapshot_download` or `mstar_hf.hub.push_folder` also talk to the local server and cache into the
  test's temp dir.
Options for `HubServer` can be given with
`@pytest.mark.parametrize("hub_server", [{"lfs": False}], indirect=True)`. The yielded server has `.env` (a full environment for `subprocess.run(..., env=server.env)`), `.token`,
`.user` and `.cache_dir`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from hub_server import DEFAULT_TOKEN, DEFAULT_USER, HubServer


@pytest.fixture
def hub_server(request, tmp_path, monkeypatch):
    # Extra HubServer options through indirect parametrization, e.g. {"lfs": False}.
    options = getattr(request, "param", None) or {}
    server = HubServer(tokens={DEFAULT_TOKEN: DEFAULT_USER}, **options).start()
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    env = {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": DEFAULT_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),  # never read the developer's own login
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_HUB_DISABLE_XET": "1",  # the local server speaks plain LFS, not Xet
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {urlsplit(server.url).hostname}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    # transformers copies the modules cache path at import; keep remote code of this test in its temp dir.
    for module_name in ("transformers.utils.hub", "transformers.dynamic_module_utils"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "HF_MODULES_CACHE"):
            monkeypatch.setattr(module, "HF_MODULES_CACHE", str(home / "modules"))
    # `transformers_modules` imported by an earlier test points at that test's cache: remote code that imports
    # its sibling files (the pipelines) would be looked up there. Import it afresh from this test's cache.
    for name in [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(home / "modules"))
    _http.close_session()  # the next client is built with this environment (proxy settings included)

    server.env = {**os.environ}
    server.token, server.user, server.cache_dir = DEFAULT_TOKEN, DEFAULT_USER, Path(cache)
    try:
        yield server
    finally:
        server.stop()
        _http.close_session()
