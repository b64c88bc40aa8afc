# token-proxy: build the wheels in one stage, run them as a non-root user in a slim image.
# The full image has the C compiler mypyc needs; the slim one runs the result.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The project (its request path compiled by mypyc: README "Performance") and its dependencies
# as wheels; uvloop (the `speed` extra) included.
ENV HATCH_BUILD_HOOK_ENABLE_MYPYC=1
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[speed]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin token-proxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
COPY config /etc/token-proxy
# DL3064 takes TOKEN_PROXY_CONFIG for a secret; it is the path of the config file.
# hadolint ignore=DL3064
ENV TOKEN_PROXY_CONFIG=/etc/token-proxy/proxy.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["token-proxy"]
CMD ["serve"]
