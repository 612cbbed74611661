# `make demo`: install what is missing, build in release mode, run the lab demo.
# `make test`: install what is missing, run the whole test suite (root: kernel tests).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: deps demo test build lint

deps:
	@bash scripts/deps.sh

build: deps
	cargo build --release -p shoal-cli -p shoal-cni

demo: build
	bash scripts/demo.sh target/release/shoal

test: deps
	bash scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
