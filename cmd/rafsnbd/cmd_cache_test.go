package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// TestCacheCommands fills a cache from the nydus fixture file by file,
// lists it, and empties it with gc.
func TestCacheCommands(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	blobDir := filepath.Dir(boot)
	const id = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	dir := filepath.Join(t.TempDir(), "cache")

	out, err := runCmd(t, "cache", "fetch", "--cache-dir", dir, "-B", boot, "-D", blobDir, "/sync_io.rs")
	if err != nil {
		t.Fatalf("fetch: %v\n%s", err, out)
	}
	if !strings.Contains(out, "1/2 chunks cached") {
		t.Errorf("fetch of one file:\n%s", out)
	}
	out, err = runCmd(t, "cache", "ls", "--cache-dir", dir, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ls struct {
		Blobs []struct {
			ID         string `json:"id"`
			Size       int64  `json:"size"`
			Units      int    `json:"units"`
			ReadyUnits int    `json:"ready_units"`
			DiskUsage  int64  `json:"disk_usage"`
		} `json:"blobs"`
	}
	if err := json.Unmarshal([]byte(out), &ls); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	ents := ls.Blobs
	if len(ents) != 1 || ents[0].ID != id || ents[0].Size != 36864 || ents[0].Units != 2 || ents[0].ReadyUnits != 1 {
		t.Errorf("ls --json: %+v", ents)
	}
	// fetch and ls say the same of the blob.
	var fetched struct {
		Blobs []struct {
			ID         string `json:"id"`
			ReadyUnits int    `json:"ready_units"`
			DiskUsage  int64  `json:"disk_usage"`
		} `json:"blobs"`
	}
	decodeJSON(t, &fetched, "cache", "fetch", "--cache-dir", dir, "-B", boot, "-D", blobDir, "/sync_io.rs", "--json")
	if len(fetched.Blobs) != 1 ||
		fetched.Blobs[0].ID != id || fetched.Blobs[0].ReadyUnits != 1 || fetched.Blobs[0].DiskUsage != ents[0].DiskUsage {
		t.Errorf("fetch --json: %+v; ls said %+v", fetched, ents)
	}
	if out, err = runCmd(t, "cache", "fetch", "--cache-dir", dir, "-B", boot, "-D", blobDir, "--all"); err != nil || !strings.Contains(out, "2/2 chunks cached") {
		t.Errorf("fetch --all: %v\n%s", err, out)
	}
	if out, err = runCmd(t, "cache", "ls", "--cache-dir", dir); err != nil || !strings.Contains(out, "2/2 chunks (100%)") {
		t.Errorf("ls: %v\n%s", err, out)
	}
	if _, err = runCmd(t, "cache", "fetch", "--cache-dir", dir, "-B", boot, "-D", blobDir, "/missing"); err == nil {
		t.Error("fetch of a missing path succeeded")
	}
	if out, err = runCmd(t, "cache", "gc", "--cache-dir", dir); err != nil || !strings.Contains(out, "0 images and 0 blobs removed") {
		t.Errorf("gc without options: %v\n%s", err, out)
	}
	if out, err = runCmd(t, "cache", "gc", "--cache-dir", dir, "--all"); err != nil || !strings.Contains(out, "0 images and 1 blobs removed") {
		t.Errorf("gc --all: %v\n%s", err, out)
	}
	if _, err = runCmd(t, "cache", "ls"); err == nil {
		t.Error("ls without --cache-dir succeeded")
	}
}

// TestCachedBlobsDevice composes the nydus fixture into the flat device
// with its blob read through the cache (what serve and nbd do with a
// cache): the device hash is the golden one of the fixture README, and a
// second run with --prefetch-all semantics fetches nothing.
func TestCachedBlobsDevice(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	const deviceSHA = "817ff91aaaabde208168c2086395e3dbd75d89239d3ef79a84302aa38b2bf2e6"
	root := t.TempDir()
	for run := range 2 {
		cache, err := openBlobCache(root, nil)
		if err != nil {
			t.Fatal(err)
		}
		img, err := blockdev.Open(context.Background(), boot, blockdev.CachedBlobs{Cache: cache, Store: localfs.New(filepath.Dir(boot))})
		if err != nil {
			t.Fatal(err)
		}
		if err := prefetchImage(img, run == 1, nil); err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(img, 0, img.Size())); err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != deviceSHA {
			t.Errorf("run %d: device sha256 %s, want %s", run, got, deviceSHA)
		}
		st := img.Blobs[0].(*blobcache.Handle).Stats()
		if run == 1 && st.BackendReads != 0 {
			t.Errorf("second run fetched %d times", st.BackendReads)
		}
		img.Close()
		if err := cache.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(root, blobCacheSubdir, ".lock")); err != nil {
		t.Errorf("blob cache not under %s: %v", blobCacheSubdir, err)
	}
}
