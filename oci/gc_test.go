package oci

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Lazy index artifacts in the cache are listed, kept by a plain gc (no
// converted image names them) and collected by --all or by age.
func TestGCIndexArtifacts(t *testing.T) {
	dir := t.TempDir()
	arts := IndexArtifactCacheDir(dir)
	if err := os.MkdirAll(arts, 0o750); err != nil {
		t.Fatal(err)
	}
	old, recent := filepath.Join(arts, strings.Repeat("a", 64)), filepath.Join(arts, strings.Repeat("b", 64))
	for _, p := range []string{old, recent} {
		if err := os.WriteFile(p, make([]byte, 5000), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	long := time.Now().Add(-30 * 24 * time.Hour)
	if err := os.Chtimes(old, long, long); err != nil {
		t.Fatal(err)
	}
	cc, err := ListCache(dir)
	if err != nil || len(cc.Files) != 2 || cc.Files[0].Kind != "index artifact" || cc.Bytes == 0 {
		t.Fatalf("ListCache: %+v, %v", cc, err)
	}
	ctx := context.Background()
	if _, _, err := GC(ctx, dir, GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(old); err != nil {
		t.Errorf("plain gc removed an index artifact: %v", err)
	}
	if _, freed, err := GC(ctx, dir, GCOptions{OlderThan: 7 * 24 * time.Hour}); err != nil || freed == 0 {
		t.Fatalf("gc --older-than 7d: freed %d, %v", freed, err)
	}
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("the 30-day-old artifact survived --older-than 7d: %v", err)
	}
	if _, err := os.Stat(recent); err != nil {
		t.Errorf("--older-than 7d removed a fresh artifact: %v", err)
	}
	if _, _, err := GC(ctx, dir, GCOptions{All: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(recent); !os.IsNotExist(err) {
		t.Errorf("gc --all left %s", recent)
	}
}
