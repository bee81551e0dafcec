package main

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// An 8-byte change in a blob fails 'rafsnbd export' without --cache-dir
// (the -D path once read blobs without checking chunk digests, and
// exported a corrupt disk with exit 0).
func TestExportCorruptBlobFails(t *testing.T) {
	dir := t.TempDir()
	src, blobs := filepath.Join(dir, "src"), filepath.Join(dir, "blobs")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	// Incompressible, so the blob starts with chunk data, where the
	// change lands (not in the chunk-info array that follows it).
	data := make([]byte, 256<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(filepath.Join(src, "file"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	boot := filepath.Join(dir, "image.boot")
	if out, err := runCmd(t, "create", "-B", boot, "-D", blobs, src); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	if out, err := runCmd(t, "export", "-B", boot, "-D", blobs, "-o", filepath.Join(dir, "good.disk")); err != nil {
		t.Fatalf("export of the intact image: %v\n%s", err, out)
	}
	ents, err := os.ReadDir(blobs)
	if err != nil || len(ents) != 1 {
		t.Fatalf("blob dir: %v, %v", ents, err)
	}
	blob := filepath.Join(blobs, ents[0].Name())
	b, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	for i := 100; i < 108; i++ {
		b[i] ^= 0x5A
	}
	if err := os.WriteFile(blob, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runCmd(t, "export", "-B", boot, "-D", blobs, "-o", filepath.Join(dir, "bad.disk"))
	if err == nil {
		t.Fatalf("export of an image with a changed blob succeeded\n%s", out)
	}
	if !strings.Contains(err.Error(), "digest mismatch") {
		t.Errorf("export fails with %v, want a chunk digest mismatch", err)
	}
}
