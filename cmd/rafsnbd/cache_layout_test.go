package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// One cache directory, one cache command: what convert put there is listed
// and collected by cache ls and gc, beside lazily cached blobs; gc of a
// directory with nothing in it creates nothing.
func TestCacheSeesConvertedImages(t *testing.T) {
	w := t.TempDir()
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	lp, err := layout.Write(filepath.Join(w, "layout"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(w, "cache")
	if code, _, stderr := runLine(t, "-q", "convert", "oci:"+filepath.Join(w, "layout")+":v1", "--cache-dir", cache, "--export", "image"); code != 0 {
		t.Fatalf("convert: %s", stderr)
	}
	// A lazily cached blob beside it.
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	if code, _, stderr := runLine(t, "-q", "cache", "fetch", "--cache-dir", cache, "-B", boot, "-D", filepath.Dir(boot), "--all"); code != 0 {
		t.Fatalf("cache fetch: %s", stderr)
	}

	var ls struct {
		Images []struct {
			Layers int   `json:"layers"`
			Bytes  int64 `json:"bytes"`
		} `json:"images"`
		Files []struct {
			Kind   string `json:"kind"`
			Images int    `json:"images"`
		} `json:"files"`
		Blobs []struct{} `json:"blobs"`
		Bytes int64      `json:"bytes"`
	}
	decodeJSON(t, &ls, "cache", "ls", "--cache-dir", cache, "--json")
	kinds := map[string]int{}
	for _, f := range ls.Files {
		kinds[f.Kind]++
		if f.Images != 1 {
			t.Errorf("file of kind %s used by %d images, want 1", f.Kind, f.Images)
		}
	}
	if len(ls.Images) != 1 || ls.Images[0].Layers != 2 || ls.Images[0].Bytes == 0 || len(ls.Blobs) != 1 ||
		kinds["layer tar"] != 2 || kinds["layer bootstrap"] != 2 || kinds["image disk"] != 1 || ls.Bytes == 0 {
		t.Errorf("cache ls --json: %+v (kinds %v)", ls, kinds)
	}
	code, text, _ := runLine(t, "cache", "ls", "--cache-dir", cache)
	if code != 0 || !strings.Contains(text, "1 converted images, 5 layer files and disks, 1 lazily cached blobs") {
		t.Errorf("cache ls:\n%s", text)
	}

	// Nothing is old enough; then everything goes.
	if code, text, _ = runLine(t, "cache", "gc", "--cache-dir", cache, "--older-than", "7d"); code != 0 || !strings.Contains(text, "0 images and 0 blobs removed") {
		t.Errorf("gc --older-than 7d:\n%s", text)
	}
	if code, text, _ = runLine(t, "cache", "gc", "--cache-dir", cache, "--all"); code != 0 || !strings.Contains(text, "1 images and 1 blobs removed") {
		t.Errorf("gc --all:\n%s", text)
	}
	for _, sub := range []string{"images", "layers", "blobs", "blobcache"} {
		ents, _ := os.ReadDir(filepath.Join(cache, sub))
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), ".") { // the blob cache's lock file
				t.Errorf("left after gc --all: %s/%s", sub, e.Name())
			}
		}
	}
	if _, stdout, _ := runLine(t, "cache", "ls", "--cache-dir", cache, "--json"); !strings.Contains(stdout, `"bytes": 0`) {
		t.Errorf("cache ls after gc --all:\n%s", stdout)
	}

	// gc and ls of a directory that holds no cache create nothing.
	empty := filepath.Join(w, "none")
	if code, _, stderr := runLine(t, "cache", "gc", "--cache-dir", empty, "--all"); code != 0 {
		t.Errorf("gc of an empty dir: %s", stderr)
	}
	if code, _, stderr := runLine(t, "cache", "ls", "--cache-dir", empty); code != 0 {
		t.Errorf("ls of an empty dir: %s", stderr)
	}
	if _, err := os.Stat(empty); !os.IsNotExist(err) {
		t.Errorf("gc or ls created %s: %v", empty, err)
	}
	var raw map[string]any
	_, stdout, _ := runLine(t, "cache", "gc", "--cache-dir", empty, "--json")
	if err := json.Unmarshal([]byte(stdout), &raw); err != nil {
		t.Errorf("gc --json: %v\n%s", err, stdout)
	}
}
