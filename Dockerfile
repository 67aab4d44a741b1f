# cfq-bridge container image: a release build with Kafka (bundled librdkafka, TLS through
# the system OpenSSL) and NATS support.
#
#   docker build -t cfq-bridge .
#   docker run --rm -v "$PWD/config:/config:ro" -e CLOUDFLARE_API_TOKEN cfq-bridge \
#     run --config /config/kafka.toml

FROM rust:1-bookworm AS build
# librdkafka is built from source by rdkafka-sys: it needs a C toolchain, make, perl and
# the OpenSSL and zlib headers, all present in the rust image.
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cfq-bridge \
    && install -m 0755 target/release/cfq-bridge /usr/local/bin/cfq-bridge

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/cfq-bridge /usr/local/bin/cfq-bridge
# An unprivileged user; configs are mounted read-only at /config, and /data is where
# a JSONL archive can be written.
RUN mkdir /data && chown 65532:65532 /data
USER 65532:65532
WORKDIR /data
ENTRYPOINT ["cfq-bridge"]
CMD ["run", "--config", "/config/kafka.toml"]
