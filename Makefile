# Comb: the two commands a newcomer needs are `make demo` and `make test`.
.PHONY: deps build release release-cli pgo-instrumented demo test lint fuzz clean-lab

CARGO ?= cargo

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --workspace

# comb (the CLI) and combd (the agent, in comb-agent) land side by side in target/release/.
# combd is profile-guided: built with the counts an instrumented combd gathered under the
# benchmarks' load (pgo/combd.profdata.gz; scripts/pgo.sh remakes it, as root). The profile
# names functions by their symbols, and cargo's symbols differ with `--target` and with the set
# of packages built together, so combd is built exactly as scripts/pgo.sh builds the
# instrumented one: alone, for the host target, in its own target directory. Code changed
# since the profile was taken is optimised as if there were none (no per-function warnings).
PGO_PROFILE := target/pgo/combd.profdata
HOST = $(shell rustc -vV | sed -n 's/^host: //p')
# The one way combd is built, with the profile and instrumented to gather it.
COMBD_PGO_BUILD = $(CARGO) build --release -p comb-agent --bin combd --target $(HOST)

release: release-cli $(PGO_PROFILE)
	RUSTFLAGS="$(strip $(RUSTFLAGS) -Cprofile-use=$(abspath $(PGO_PROFILE)) -Cllvm-args=-no-pgo-warn-mismatch)" \
		$(COMBD_PGO_BUILD) --target-dir target/pgo-use
	ln -f target/pgo-use/$(HOST)/release/combd target/release/combd

release-cli: deps
	$(CARGO) build --release -p comb-cli -p comb-cni

# For scripts/pgo.sh: combd writing its counts into the directory PGO_RAW.
pgo-instrumented:
	RUSTFLAGS="-Cprofile-generate=$(PGO_RAW)" $(COMBD_PGO_BUILD) --target-dir target/pgo-generate

$(PGO_PROFILE): pgo/combd.profdata.gz
	mkdir -p $(dir $@)
	gunzip -c $< > $@.tmp && mv $@.tmp $@

demo: release
	@bash scripts/demo.sh target/release

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/module-cycles.py

# Everything: style, unit tests and the privileged lab tests (run as root).
# combd is built first: comb-cli's lab tests start it from target/<profile>/.
test: lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

# Fuzz the manifest parser and converter, and the policy conversions (needs the nightly
# toolchain and cargo-fuzz). FUZZ_SECS per target.
fuzz:
	cd fuzz && cargo +nightly fuzz run manifest -- -max_total_time=$${FUZZ_SECS:-60}
	cd fuzz && mkdir -p corpus/policy && cargo +nightly fuzz run policy corpus/policy seeds/policy -- -dict=policy.dict -max_total_time=$${FUZZ_SECS:-60}
	cd fuzz && mkdir -p corpus/http1_stream && cargo +nightly fuzz run http1_stream corpus/http1_stream seeds/http1_stream -- -max_total_time=$${FUZZ_SECS:-60}

clean-lab:
	-target/debug/comb lab down --all 2>/dev/null || target/release/comb lab down --all
