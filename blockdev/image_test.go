package blockdev

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/verity"
)

// Golden values from shared/fixtures/nydus/README.md.
const (
	fixtureBoot      = "rafs-v6-2.2.boot"
	fixtureBlob      = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	fixtureDevSize   = 2134016
	fixtureDevSHA256 = "817ff91aaaabde208168c2086395e3dbd75d89239d3ef79a84302aa38b2bf2e6"
	fixtureBlobSpace = "66c3387eb172d604c659d25771cf8979953613d89970f66264d435dbbc17c763"
	fixtureNydusRoot = "0e577911b78a08d2b0efc5145ac2278a515289f3d16b4a5d40ad57a9fce43da5"
	fixtureNydusFile = "5684c330c622350c12d633d0773201f862b9955375d806670e1aaf36ef038b31"
	fixtureStdRoot   = "c40428ba96438e709d3e96269df966719177b2d03effd984f34e6a35a92c6088"
	fixtureNydusLine = `dm-verity options: --no-superblock --format=1 -s "" --hash=sha256 --data-block-size=4096 --hash-block-size=4096 --data-blocks 521 --hash-offset 2134016 ` + fixtureNydusRoot
)

func openFixture(t *testing.T) *Image {
	t.Helper()
	boot := testutil.NydusFixture(t, fixtureBoot)
	img, err := Open(context.Background(), boot, LocalBlobs{Dir: filepath.Dir(boot)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func sha256Hex(t *testing.T, r io.Reader) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestComposeFixtureGolden(t *testing.T) {
	img := openFixture(t)
	if img.Size() != fixtureDevSize || img.BlockSize() != 4096 {
		t.Fatalf("device %d bytes, block %d; want %d, 4096", img.Size(), img.BlockSize(), fixtureDevSize)
	}
	if got := sha256Hex(t, io.NewSectionReader(img, 0, img.Size())); got != fixtureDevSHA256 {
		t.Errorf("device sha256 %s, want %s", got, fixtureDevSHA256)
	}
	if got := sha256Hex(t, io.NewSectionReader(img, 512*4096, 9*4096)); got != fixtureBlobSpace {
		t.Errorf("blocks 512-520 sha256 %s, want %s", got, fixtureBlobSpace)
	}
	b := make([]byte, 4096)
	if _, err := img.ReadAt(b, 0x208*4096); err != nil {
		t.Errorf("read of block 0x208: %v", err)
	}
	if _, err := img.ReadAt(b, 0x209*4096); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("read of block 0x209: %v, want ErrOutOfRange", err)
	}
	if _, err := img.ReadAt(b[:1], 1024); err != nil || b[0] != 0xe2 {
		t.Errorf("byte 1024 = %#x (%v), want 0xe2", b[0], err)
	}
}

// The snapshotter fixture's blob has mapped_blkaddr 0: nydus refuses to
// flatten it and so must we, with a message that says why.
func TestComposeRefusesZeroMappedBlkAddr(t *testing.T) {
	boot := testutil.NydusFixture(t, "snapshotter-v6-bootstrap-chunk-pos-438272.boot")
	_, err := Open(context.Background(), boot, zeroBlobs{})
	if !errors.Is(err, ErrNotFlattenable) || !strings.Contains(err.Error(), "is zero") {
		t.Fatalf("err = %v, want ErrNotFlattenable naming the zero mapped block address", err)
	}
}

// zeroBlobs stands in for blobs that are not available (only the layout is tested).
type zeroBlobs struct{}

func (zeroBlobs) OpenBlob(context.Context, *rafs.BlobEntry, []rafs.ChunkInfo) (BlobReader, error) {
	return nopCloser{zeroReader{}}, nil
}

type zeroReader struct{}

func (zeroReader) ReadAt(p []byte, _ int64) (int, error) { clear(p); return len(p), nil }

type nopCloser struct{ io.ReaderAt }

func (nopCloser) Close() error { return nil }

// nydus' own test_export golden value, byte for byte, and veritysetup's
// root for the standard tree over the same data.
func TestExportFixtureVerityGolden(t *testing.T) {
	img := openFixture(t)
	dir := t.TempDir()
	for _, c := range []struct {
		compat   verity.Compat
		root     string
		fileHash string
	}{{verity.NydusCompat, fixtureNydusRoot, fixtureNydusFile}, {verity.Standard, fixtureStdRoot, ""}} {
		p := verity.NydusParams(uint64(img.Size()), int(img.BlockSize()))
		p.Compat = c.compat
		path := filepath.Join(dir, c.compat.String()+".disk")
		res, err := Export(context.Background(), img, path, ExportOptions{Verity: &p})
		if err != nil {
			t.Fatal(err)
		}
		if res.Tree.RootHex() != c.root {
			t.Errorf("%v root %s, want %s", c.compat, res.Tree.RootHex(), c.root)
		}
		if c.compat == verity.NydusCompat {
			if line := res.Tree.Options(); line != fixtureNydusLine {
				t.Errorf("options line\n got %s\nwant %s", line, fixtureNydusLine)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := sha256Hex(t, f); got != c.fileHash {
				t.Errorf("nydus export sha256 %s, want %s", got, c.fileHash)
			}
			f.Close()
			if res.Size != 2158592 {
				t.Errorf("export size %d, want 2158592", res.Size)
			}
		}
	}
}

// Kernel truth: the exported fixture mounts and shows the golden files.
func TestExportFixtureMounts(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "mount", "umount")
	img := openFixture(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "fixture.disk")
	p := verity.NydusParams(uint64(img.Size()), int(img.BlockSize()))
	if _, err := Export(context.Background(), img, disk, ExportOptions{Verity: &p}); err != nil {
		t.Fatal(err)
	}
	mnt := testutil.MountErofs(t, disk, "loop", "sizelimit="+strconv.FormatInt(img.Size(), 10))
	for _, f := range []struct {
		name   string
		size   int64
		mtime  time.Time
		sha256 string
	}{
		{"lib.rs", 16931, time.Unix(1676819553, 628661334), "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69"},
		{"sync_io.rs", 13400, time.Unix(1676819553, 628993084), "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96"},
	} {
		path := filepath.Join(mnt, f.name)
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() != f.size || fi.Mode() != 0o644 || !fi.ModTime().Equal(f.mtime) {
			t.Errorf("%s: size %d mode %v mtime %v; want %d, -rw-r--r--, %v", f.name, fi.Size(), fi.Mode(), fi.ModTime(), f.size, f.mtime)
		}
		fh, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := sha256Hex(t, fh); got != f.sha256 {
			t.Errorf("%s sha256 %s, want %s", f.name, got, f.sha256)
		}
		fh.Close()
	}
	ents, err := os.ReadDir(mnt)
	if err != nil || len(ents) != 2 {
		t.Errorf("mounted root has %d entries (%v), want lib.rs and sync_io.rs", len(ents), err)
	}
}
