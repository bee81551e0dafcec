# rafsnbd — see README.md. Every target installs what it needs first.
GO      ?= go
BIN     ?= bin/rafsnbd
FUZZTIME ?= 5m
PREFIX  ?= /usr/local

.PHONY: all build install test run bench fuzz lint clean

all: build

build:
	$(GO) build -trimpath -buildvcs=auto -o $(BIN) ./cmd/rafsnbd

# bin/rafsnbd into $(PREFIX)/bin, with the nydus-image symlink through which
# nydus-snapshotter's tarfs mode runs it (its nydus_image_path).
install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/rafsnbd
	ln -sfn rafsnbd $(DESTDIR)$(PREFIX)/bin/nydus-image

# The whole test suite (what CI runs).
test:
	scripts/test.sh

# The main job on the built-in example: a directory build, then an OCI image.
run:
	scripts/example.sh
	scripts/example-oci.sh

# Go benchmarks, then the scripts that measure against peer tools.
bench: build
	$(GO) test -run='^$$' -bench=. -benchmem -count=5 ./... | tee bench.txt
	@for s in scripts/bench-*.sh; do echo "== $$s"; "$$s" || exit 1; done

# Longer fuzzing of every target ($(FUZZTIME) each); found inputs stay in testdata/fuzz.
fuzz:
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

lint:
	scripts/deps.sh
	test -z "$$(gofmt -l $$(git ls-files '*.go'))"
	$(GO) vet ./...
	PATH="$$($(GO) env GOPATH)/bin:$$PATH" staticcheck ./...

clean:
	rm -rf bin bench.txt
