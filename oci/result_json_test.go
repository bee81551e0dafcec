package oci

import (
	"context"
	"encoding/json"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// convert --json prints a Result: every key is snake_case, as in every
// other JSON rafsnbd prints.
func TestResultJSONKeys(t *testing.T) {
	b, err := json.Marshal(Result{
		Layers:  []LayerResult{{Index: 1}},
		Exports: []Export{{Kind: "image", Verity: "x", Compat: "x", DataBlocks: 1, HashOffset: 1, RootHash: "x", Took: 1, Reused: true}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var walk func(v any)
	snake := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	n := 0
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				n++
				if !snake.MatchString(k) {
					t.Errorf("key %q is not snake_case", k)
				}
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	walk(v)
	if n < 30 {
		t.Errorf("only %d keys seen in %s", n, b)
	}
}

// A single-platform image of another platform than the one asked for with
// --platform is refused, not converted silently.
func TestConvertPlatformSingleImage(t *testing.T) {
	dir := t.TempDir()
	img := newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip"))
	layoutDir := filepath.Join(dir, "layout")
	writeLayout(t, layoutDir, "v1", img)
	other := "linux/s390x"
	if runtime.GOARCH == "s390x" {
		other = "linux/arm64"
	}
	_, err := Convert(context.Background(), "oci:"+layoutDir+":v1", Options{CacheDir: filepath.Join(dir, "cache"), Platform: other})
	if err == nil || !strings.Contains(err.Error(), "is an image for linux/"+runtime.GOARCH+", not "+other) {
		t.Errorf("--platform %s of a linux/%s image: %v", other, runtime.GOARCH, err)
	}
	convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: filepath.Join(dir, "cache"), Platform: "linux/" + runtime.GOARCH})
	convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: filepath.Join(dir, "cache")})
}
