package rafs

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// mountWithDevices mounts boot with one extra device per blob file and
// returns the mount point; cleanup unmounts.
func mountWithDevices(t *testing.T, boot string, blobs []string) string {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "losetup", "mount", "umount")
	meta := testutil.Losetup(t, boot)
	var opts []string
	for _, b := range blobs {
		opts = append(opts, "device="+testutil.Losetup(t, b))
	}
	return testutil.MountErofs(t, meta, opts...)
}

// kernelCompare checks every walked path against the mounted tree.
func kernelCompare(t *testing.T, img *Image, blobs []io.ReaderAt, mnt string) {
	t.Helper()
	fsys := img.FS(blobs)
	walked := 0
	err := img.Walk(func(p string, e *Entry) error {
		walked++
		full := filepath.Join(mnt, p)
		var st syscall.Stat_t
		if err := syscall.Lstat(full, &st); err != nil {
			t.Errorf("kernel has no %s: %v", p, err)
			return nil
		}
		if uint16(st.Mode) != e.Mode || st.Uid != e.UID || st.Gid != e.GID || uint32(st.Nlink) != e.Nlink {
			t.Errorf("%s: kernel mode %#o uid %d gid %d nlink %d; ours %#o %d %d %d", p, st.Mode, st.Uid, st.Gid, st.Nlink, e.Mode, e.UID, e.GID, e.Nlink)
		}
		if !e.IsDir() && uint64(st.Size) != e.Size {
			t.Errorf("%s: kernel size %d, ours %d", p, st.Size, e.Size)
		}
		if uint64(st.Mtim.Sec) != e.Mtime || uint32(st.Mtim.Nsec) != e.MtimeNsec {
			t.Errorf("%s: kernel mtime %d.%09d, ours %d.%09d", p, st.Mtim.Sec, st.Mtim.Nsec, e.Mtime, e.MtimeNsec)
		}
		if t0 := e.Mode & ModeTypeMask; (t0 == ModeChar || t0 == ModeBlock) && uint32(st.Rdev) != e.Rdev {
			t.Errorf("%s: kernel rdev %#x, ours %#x", p, st.Rdev, e.Rdev)
		}
		for _, x := range e.Xattrs {
			if !strings.HasPrefix(x.Name, "user.") && !strings.HasPrefix(x.Name, "trusted.") {
				continue // ACLs and capabilities are reinterpreted by the kernel
			}
			buf := make([]byte, 65536)
			n, err := syscall.Getxattr(full, x.Name, buf)
			if err != nil || !bytes.Equal(buf[:n], x.Value) {
				t.Errorf("%s: kernel xattr %s = %q (%v), ours %q", p, x.Name, buf[:max(n, 0)], err, x.Value)
			}
		}
		switch {
		case e.IsSymlink():
			if target, err := os.Readlink(full); err != nil || target != e.Target {
				t.Errorf("%s: kernel link %q (%v), ours %q", p, target, err, e.Target)
			}
		case e.IsRegular():
			theirs, err := os.ReadFile(full)
			if err != nil {
				t.Errorf("%s: kernel read: %v", p, err)
				return nil
			}
			ours, err := fs.ReadFile(fsys, strings.TrimPrefix(p, "/"))
			if err != nil || !bytes.Equal(ours, theirs) {
				t.Errorf("%s: contents differ from the kernel's (%d vs %d bytes, %v)", p, len(ours), len(theirs), err)
			}
		case e.IsDir():
			ents, err := os.ReadDir(full)
			mine, err2 := img.ReadDir(e.Nid)
			if err != nil || err2 != nil || len(ents) != len(mine) {
				t.Errorf("%s: kernel lists %d entries (%v), we %d (%v)", p, len(ents), err, len(mine), err2)
				return nil
			}
			for i := range ents {
				if ents[i].Name() != mine[i].Name {
					t.Errorf("%s: entry %d is %q in the kernel, %q here", p, i, ents[i].Name(), mine[i].Name)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if walked < 3 {
		t.Fatalf("walked only %d entries", walked)
	}
}

func TestKernelMountFixture22(t *testing.T) {
	testutil.RequireRoot(t)
	img, ur := fixture22Uncompressed(t)
	dev := erofsDevices(t, img, []io.ReaderAt{ur})
	mnt := mountWithDevices(t, img.closer.(*os.File).Name(), dev)
	kernelCompare(t, img, []io.ReaderAt{ur}, mnt)
}

func TestKernelMountSynth(t *testing.T) {
	testutil.RequireRoot(t)
	for _, opts := range []synthOpts{
		{chunkBits: 0},
		{chunkBits: 8, inlineDirs: true},
		{tarfs: true, chunkBits: 3},
		{tarfs: true, chunkBits: 11, inlineDirs: true},
	} {
		t.Run(fmt.Sprintf("tarfs=%v,chunkbits=%d,inline=%v", opts.tarfs, opts.chunkBits, opts.inlineDirs), func(t *testing.T) {
			boot, blob := buildSynth(t, opts, synthTree())
			dir := t.TempDir()
			bootPath, blobPath := filepath.Join(dir, "boot"), filepath.Join(dir, "blob")
			if err := os.WriteFile(bootPath, boot, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(blobPath, blob, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(bootPath)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			mnt := mountWithDevices(t, bootPath, []string{blobPath})
			kernelCompare(t, img, []io.ReaderAt{bytes.NewReader(blob)}, mnt)
		})
	}
}

// The snapshotter fixture's 3517 paths, with a zero-filled stand-in for its
// missing blob: metadata, directory listings and symlinks as the kernel
// sees them.
func TestKernelMountSnapshotter(t *testing.T) {
	testutil.SkipShort(t)
	testutil.RequireRoot(t)
	img := openFixture(t, fixtureSnap)
	dev := erofsDevices(t, img, nil)
	mnt := mountWithDevices(t, img.closer.(*os.File).Name(), dev)
	kernelCompare(t, img, []io.ReaderAt{zeroBlob{int64(img.Blobs[0].UncompressedSize)}}, mnt)
}
