package build

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// The builder's temporaries carry the one marker that cache gc removes,
// and a finished blob is never renamed over a symlink.
func TestBlobTemporaries(t *testing.T) {
	dir := t.TempDir()
	tarTmp, err := newTarTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer tarTmp.Abort()
	blobTmp, err := newBlobTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(blobTmp.Name())
	blobTmp.Close()
	for _, f := range []string{tarTmp.Name(), blobTmp.Name()} {
		if !atomicfile.IsTemp(filepath.Base(f)) {
			t.Errorf("%s is not recognised as a temporary", f)
		}
	}

	elsewhere := filepath.Join(t.TempDir(), "elsewhere")
	os.WriteFile(elsewhere, []byte("keep"), 0o644)
	id := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	if err := os.Symlink(elsewhere, filepath.Join(dir, id)); err != nil {
		t.Fatal(err)
	}
	if _, err := commitBlob(blobTmp.Name(), dir, id, true, 0o644); !errors.Is(err, atomicfile.ErrNotRegular) {
		t.Fatalf("commit over a symlink: %v", err)
	}
	if st, _ := os.Lstat(filepath.Join(dir, id)); st.Mode()&os.ModeSymlink == 0 {
		t.Error("the symlink was replaced")
	}
	if got, _ := os.ReadFile(elsewhere); string(got) != "keep" {
		t.Errorf("the symlink's target holds %q", got)
	}
}
