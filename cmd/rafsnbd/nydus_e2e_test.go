package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/oci"
)

// Issue 14: the real nydus bootstrap (rafs-v6-2.2.boot) and its blob,
// published as a nydus image into an OCI layout, served by serve --image
// from the layout and mounted through the kernel with the fixture
// README's file digests. The blob's id is not the sha256 of its bytes: the
// layout stores it by digest, and its layer's org.rafsnbd.nydus.blob-id
// annotation names the id the bootstrap uses.
func TestNydusFixtureServe(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "nbdfuse")
	bin := buildBinary(t)
	const blobID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	boot, err := os.ReadFile(testutil.NydusFixture(t, "rafs-v6-2.2.boot"))
	if err != nil {
		t.Fatal(err)
	}
	ref := "oci:" + filepath.Join(t.TempDir(), "layout") + ":v1"
	if _, err := oci.PublishNydus(context.Background(), ref, nil, []oci.NydusBlobFile{{ID: blobID, Path: testutil.NydusFixture(t, blobID)}}, boot, oci.NydusPublishOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, cache := range []string{"", filepath.Join(t.TempDir(), "cache")} {
		args := []string{"--image", ref}
		if cache != "" {
			args = append(args, "--cache-dir", cache)
		}
		mnt := mountNBD(t, startServe(t, bin, args...))
		for name, want := range map[string]string{
			"lib.rs":     "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69",
			"sync_io.rs": "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96",
		} {
			if got := testutil.FileSHA256(t, filepath.Join(mnt, name)); got != want {
				t.Fatalf("cache %q: %s has sha256 %s, the fixture README says %s", cache, name, got, want)
			}
		}
	}
}
