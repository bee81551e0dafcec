package oci

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/regclient"
	"github.com/rafsnbd/rafsnbd/internal/testregistry"
)

// Image references as users spell them, and the errors of a registry that
// lacks what they name: one line each, naming each thing once.

// TestConvertDockerTransport: skopeo's "docker://" spelling names the same
// registry image, for conversion and for lookups.
func TestConvertDockerTransport(t *testing.T) {
	reg := testregistry.Start(t)
	pushImage(t, reg+"/app:v1", newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip")))
	cache := filepath.Join(t.TempDir(), "cache")
	res := convertT(t, "docker://"+reg+"/app:v1", Options{CacheDir: cache, Insecure: true})
	if res.Ref != reg+"/app:v1" {
		t.Errorf("converted ref %q, want %s", res.Ref, reg+"/app:v1")
	}
	for _, q := range []string{"docker://" + reg + "/app:v1", reg + "/app:v1"} {
		if rec, err := LookupImage(cache, q); err != nil || rec.ManifestDigest != res.ManifestDigest {
			t.Errorf("LookupImage(%s) = %v, %v", q, rec, err)
		}
	}
	if r, err := CanonicalRef("docker://alpine", false); err != nil || r != "index.docker.io/library/alpine:latest" {
		t.Errorf("CanonicalRef(docker://alpine) = %q, %v", r, err)
	}
}

// TestConvertSkopeoTransports: skopeo's other transports are explained in
// one line, without asking the network about a host called "oci-archive".
func TestConvertSkopeoTransports(t *testing.T) {
	cache := filepath.Join(t.TempDir(), "cache")
	for _, c := range []struct{ ref, want string }{
		{"oci-archive:/tmp/app.tar", "extract it (tar -xf) and convert oci:DIR[:TAG]"},
		{"docker-archive:/tmp/app.tar", "skopeo copy docker-archive:/tmp/app.tar oci:DIR:TAG"},
		{"containers-storage:app:v1", "skopeo copy containers-storage:app:v1 oci:DIR:TAG"},
		{"docker-daemon:app:v1", "not skopeo's docker-daemon: transport"},
	} {
		start := time.Now()
		err := expectError(t, c.ref, Options{CacheDir: cache}, c.want, "rafsnbd reads registries and OCI layouts")
		if strings.Contains(err.Error(), "\n") || time.Since(start) > time.Second {
			t.Errorf("%s: %q took %s", c.ref, err, time.Since(start))
		}
	}
}

// TestConvertMissingTag: a tag the repository lacks is named once, with
// the tags it has (was: "... MANIFEST_UNKNOWN: manifest unknown; map[Tag:nope]").
func TestConvertMissingTag(t *testing.T) {
	reg := testregistry.Start(t)
	img := newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip"))
	pushImage(t, reg+"/app:v2", img)
	pushImage(t, reg+"/app:v1", img)
	cache := filepath.Join(t.TempDir(), "cache")
	_, err := Convert(context.Background(), reg+"/app:nope", Options{CacheDir: cache, Insecure: true})
	if want := "oci: " + reg + "/app:nope: no such tag (the repository has: v1, v2)"; err == nil || err.Error() != want {
		t.Errorf("missing tag: %v\nwant %s", err, want)
	}
	_, err = Convert(context.Background(), reg+"/none:v1", Options{CacheDir: cache, Insecure: true})
	if err == nil || !strings.HasPrefix(err.Error(), "oci: "+reg+"/none:v1: no such repository: HTTP 404 Not Found (NAME_UNKNOWN") {
		t.Errorf("missing repository: %v", err)
	}
	checkNothingDone(t, cache)
}

// TestConvertMissingBlob: a layer or config blob the registry lost is named
// once, in a short line (was 419 characters naming the layer three times).
func TestConvertMissingBlob(t *testing.T) {
	reg, storage := testregistry.StartDir(t)
	layer := newLayer(t, makeTar(t, tFile("data", "lost")), "gzip")
	pushImage(t, reg+"/lost/layer:v1", newImage(t, layer))
	img2 := newImage(t, newLayer(t, makeTar(t, tFile("data", "kept")), "gzip"))
	pushImage(t, reg+"/lost/config:v1", img2)
	cfg2, err := img2.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	removeBlobData(t, storage, layer.digest.Hex)
	removeBlobData(t, storage, cfg2.Hex)

	for _, c := range []struct {
		ref, id, where string
	}{
		{reg + "/lost/layer:v1", layer.digest.String(), "oci: layer 0 (" + layer.digest.String() + "): "},
		{reg + "/lost/config:v1", cfg2.String(), "oci: " + reg + "/lost/config:v1: config " + cfg2.String() + ": "},
	} {
		cache := filepath.Join(t.TempDir(), "cache")
		err := expectError(t, c.ref, Options{CacheDir: cache, Insecure: true}, c.where, "HTTP 404 Not Found (BLOB_UNKNOWN")
		checkBlobMessage(t, err, strings.TrimPrefix(c.id, "sha256:"))
		if !errors.Is(err, regclient.ErrNotFound) {
			t.Errorf("%v does not wrap regclient.ErrNotFound", err)
		}
		checkNothingDone(t, cache)
	}
}

// checkBlobMessage wants the blob's hex exactly once in a message under
// 200 characters.
func checkBlobMessage(t *testing.T, err error, hex string) {
	t.Helper()
	msg := err.Error()
	if n := strings.Count(msg, hex); n != 1 {
		t.Errorf("the blob id appears %d times in %q", n, msg)
	}
	if len(msg) >= 200 {
		t.Errorf("%d characters: %q", len(msg), msg)
	}
}

// removeBlobData deletes a blob's bytes from docker-registry's storage
// (.../blobs/sha256/<2 hex>/<hex>/data), leaving the repository's link.
func removeBlobData(t *testing.T, storage, hex string) {
	t.Helper()
	p := filepath.Join(storage, "docker", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data")
	if err := os.Remove(p); err != nil {
		t.Fatalf("removing the blob from the registry's storage: %v", err)
	}
}

// TestLookupShortDigest: a digest prefix needs 12 hex digits; fewer say so
// instead of "no converted image".
func TestLookupShortDigest(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "v1", newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip")))
	res := convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache})
	hex := hexOf(res.ManifestDigest)
	for _, c := range []struct{ q, want string }{
		{"sha256:" + hex[:8], "oci: sha256:" + hex[:8] + ": give at least 12 hex digits of the manifest digest"},
		{hex[:8], "oci: " + hex[:8] + ": no converted image of that reference in " + cache + ", and a manifest digest prefix needs at least 12 hex digits"},
		{"sha256:xyz", "oci: sha256:xyz: not a manifest digest (want sha256: and 12 to 64 hex digits)"},
	} {
		if _, err := LookupImage(cache, c.q); err == nil || err.Error() != c.want {
			t.Errorf("LookupImage(%s) = %v\nwant %s", c.q, err, c.want)
		}
	}
	for _, q := range []string{hex[:12], "sha256:" + hex[:12], res.ManifestDigest} {
		if rec, err := LookupImage(cache, q); err != nil || rec.ManifestDigest != res.ManifestDigest {
			t.Errorf("LookupImage(%s) = %v, %v", q, rec, err)
		}
	}
}
