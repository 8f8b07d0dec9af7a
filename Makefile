# The few targets a person types. Everything else is cargo.
CONSUMERS ?= 2

.PHONY: test lint compose-smoke run demo bench soak

test:            ## every test, starting a local broker if none answers
	scripts/test

lint:            ## what CI checks besides the tests
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	scripts/check-deploy

compose-smoke:   ## docker-compose.yml on a real Docker engine, checked (root; CI runs it)
	scripts/compose-smoke

run:             ## the compose topology as local processes: collector, API, CONSUMERS consumers
	scripts/run-local $(CONSUMERS)

demo:            ## the seed's task_master.py against a running fleet
	cargo run --release -q --bin fleet-producer -- demo

bench:           ## the issue 7 figures of docs/BENCHMARKS.md against the local broker
	cargo build --release -q --workspace --bins
	target/release/fleet-bench --tasks 50000
	target/release/fleet-bench --tasks 50000 --results-per-message 256
	target/release/fleet-bench --tasks 50000 --work-queues 2
	target/release/fleet-bench --paced 1000 --seconds 10 --rounds 3
	target/release/fleet-bench --paced 1000 --seconds 10 --hops 2
	target/release/fleet-bench --workers
	target/release/fleet-bench --shapes --tasks 20000 --rounds 5

SOAK ?= 5m
soak:            ## steady load for SOAK with consumers killed and connections cut at random
	cargo build --release -q --workspace --bins
	target/release/fleet-bench --soak $(SOAK) --chaos
