package treecmp

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCompareFindsEachKindOfDifference(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	for _, root := range []string{a, b} {
		os.WriteFile(filepath.Join(root, "f"), []byte("same"), 0o644)
		os.Link(filepath.Join(root, "f"), filepath.Join(root, "hl"))
		os.Symlink("f", filepath.Join(root, "s"))
		os.Mkdir(filepath.Join(root, "d"), 0o755)
	}
	if diffs, err := Compare(a, b, Options{IgnoreMtime: true}); err != nil || len(diffs) != 0 {
		t.Fatalf("identical trees: %v %v", diffs, err)
	}
	os.WriteFile(filepath.Join(b, "f"), []byte("diff"), 0o644) // content (also through hl)
	os.Chmod(filepath.Join(b, "d"), 0o700)
	os.Remove(filepath.Join(b, "s"))
	os.Symlink("elsewhere", filepath.Join(b, "s"))
	os.WriteFile(filepath.Join(b, "extra"), nil, 0o644)
	diffs, err := Compare(a, b, Options{IgnoreMtime: true})
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(diffs, "\n")
	for _, want := range []string{"f: content", "hl: content", "d: mode", "s: symlink target", "extra: unexpected"} {
		if !strings.Contains(joined, want) {
			t.Errorf("no %q in:\n%s", want, joined)
		}
	}
	os.Remove(filepath.Join(b, "hl"))
	os.WriteFile(filepath.Join(b, "hl"), []byte("same"), 0o644)
	if diffs, _ := Compare(a, b, Options{IgnoreMtime: true}); !strings.Contains(strings.Join(diffs, "\n"), "hardlink group") {
		t.Errorf("a broken hardlink was not reported: %v", diffs)
	}
}
