# The service as a static binary on distroless (about 6 MB), run as a non-root user.
# `make docker` builds it with the commit facts; .dockerignore keeps .git out of the context.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own: rebuilt only when Cargo.toml, Cargo.lock or the
# Makefile change.
COPY Cargo.toml Cargo.lock Makefile ./
RUN echo 'fn main() {}' > main.rs && make build && rm main.rs
COPY . .
# build.rs reads these where there is no .git.
ARG VERSION=local
ARG GIT_COMMIT=""
ARG GIT_COMMIT_TIME=""
ARG GIT_DIRTY=false
# Touched so that cargo rebuilds main.rs rather than keep the placeholder built above.
RUN touch main.rs && make install VERSION="$VERSION" DEST=/service

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /service /service
# distroless's nonroot user, by number so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
ENV PORT=8080
EXPOSE 8080
ENTRYPOINT ["/service"]
