# Multi-stage build: the gateway binary on a distroless, non-root runtime (uid 65532, as in
# deploy/base/deployment.yaml). Not built in CI here (no container engine on the build machine).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p signal-gateway \
 && cp target/release/signal-gateway /signal-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /signal-gateway /usr/local/bin/signal-gateway
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/signal-gateway"]
CMD ["serve"]
