package verity

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// Golden values from nydus (service/src/block_device.rs test_export, see
// shared/fixtures/nydus/README.md) and from veritysetup on the same bytes.
const (
	fixtureDeviceSHA256 = "817ff91aaaabde208168c2086395e3dbd75d89239d3ef79a84302aa38b2bf2e6"
	nydusRoot           = "0e577911b78a08d2b0efc5145ac2278a515289f3d16b4a5d40ad57a9fce43da5"
	nydusFileSHA256     = "5684c330c622350c12d633d0773201f862b9955375d806670e1aaf36ef038b31"
	standardRoot        = "c40428ba96438e709d3e96269df966719177b2d03effd984f34e6a35a92c6088"
	nydusOptions        = `dm-verity options: --no-superblock --format=1 -s "" --hash=sha256 --data-block-size=4096 --hash-block-size=4096 --data-blocks 521 --hash-offset 2134016 ` + nydusRoot
)

// fixtureDevice composes the flat device of rafs-v6-2.2.boot and its blob
// by hand (this package must not depend on blockdev): the bootstrap, zeros
// up to block 512, then the blob's uncompressed space.
func fixtureDevice(t *testing.T) []byte {
	t.Helper()
	boot, err := os.ReadFile(testutil.NydusFixture(t, "rafs-v6-2.2.boot"))
	if err != nil {
		t.Fatal(err)
	}
	blob, err := os.ReadFile(testutil.NydusFixture(t, "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"))
	if err != nil {
		t.Fatal(err)
	}
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	dev := make([]byte, 521*4096)
	copy(dev, boot)
	space := dev[512*4096:]
	for _, c := range []struct{ coff, csize, uoff, usize int }{{0, 4828, 0, 16931}, {4828, 2974, 20480, 13400}} {
		out, err := dec.DecodeAll(blob[c.coff:c.coff+c.csize], nil)
		if err != nil {
			t.Fatalf("decompress chunk at %d: %v", c.coff, err)
		}
		if len(out) != c.usize {
			t.Fatalf("chunk at %d: %d bytes, want %d", c.coff, len(out), c.usize)
		}
		copy(space[c.uoff:], out)
	}
	if got := sha256Hex(dev); got != fixtureDeviceSHA256 {
		t.Fatalf("composed fixture device sha256 %s, want %s", got, fixtureDeviceSHA256)
	}
	return dev
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestNydusGolden(t *testing.T) {
	dev := fixtureDevice(t)
	p := NydusParams(uint64(len(dev)), 4096)
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}

	tree := buildInMemory(t, p, dev)
	if tree.RootHex() != nydusRoot {
		t.Fatalf("nydus-compat root %s, want %s", tree.RootHex(), nydusRoot)
	}
	if len(tree.HashArea) != 24576 {
		t.Fatalf("tree %d bytes, want 24576", len(tree.HashArea))
	}
	if got := tree.Options(); got != nydusOptions {
		t.Fatalf("options line\n got %s\nwant %s", got, nydusOptions)
	}

	// The tree appended to the disk file through a WriterAt gives nydus'
	// whole-file digest.
	path := filepath.Join(t.TempDir(), "disk")
	writeFile(t, path, dev)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := Build(context.Background(), f, p, f); err != nil {
		t.Fatal(err)
	}
	disk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(disk) != 2158592 || sha256Hex(disk) != nydusFileSHA256 {
		t.Fatalf("disk file: %d bytes sha256 %s, want 2158592 bytes %s", len(disk), sha256Hex(disk), nydusFileSHA256)
	}
	if err := Verify(context.Background(), f, f, p, tree.Root); err != nil {
		t.Fatalf("Verify (nydus mode) of nydus' disk file: %v", err)
	}

	// The same data in Standard mode is what veritysetup computes, and a
	// Standard verify of the nydus tree trips over its filled spare slots.
	std := p
	std.Compat = Standard
	stdTree := buildInMemory(t, std, dev)
	if stdTree.RootHex() != standardRoot {
		t.Fatalf("standard root %s, want %s", stdTree.RootHex(), standardRoot)
	}
	err = Verify(context.Background(), f, f, std, stdTree.Root)
	var ce *CorruptionError
	if !errors.As(err, &ce) || ce.Kind != BadSpareArea {
		t.Fatalf("standard Verify of a nydus tree: %v, want a spare-area error", err)
	}
}

func TestNydusGoldenAgainstVeritysetup(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	dev := fixtureDevice(t)
	p := NydusParams(uint64(len(dev)), 4096)
	dir := t.TempDir()
	path := filepath.Join(dir, "disk")
	writeFile(t, path, dev)
	std := p
	std.Compat = Standard
	if root := veritysetupFormat(t, std, path, path); root != standardRoot {
		t.Fatalf("veritysetup root %s, want %s", root, standardRoot)
	}
	// veritysetup verify rejects nydus' tree only for its spare slots.
	tree := buildInMemory(t, p, dev)
	hashFile := filepath.Join(dir, "nydus.hash")
	writeFile(t, hashFile, tree.HashArea)
	std.HashOffset = 0
	rc, _, stderr := veritysetupVerify(t, std, path, hashFile, nydusRoot)
	if rc == 0 || !strings.Contains(stderr, "Spare area is not zeroed") {
		t.Fatalf("veritysetup verify of the nydus tree: rc=%d %s", rc, stderr)
	}
}

func TestNydusFillDigest(t *testing.T) {
	const want = "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7"
	if got := hex.EncodeToString(nydusFillDigest[:]); got != want {
		t.Fatalf("fill digest %s, want %s", got, want)
	}
}
