package oci

import (
	"archive/tar"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
	"github.com/rafsnbd/rafsnbd/rafs"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if cliPath != "" {
		os.RemoveAll(filepath.Dir(cliPath))
	}
	os.Exit(code)
}

// ociTestLayers are four layers exercising what OCI extraction does:
// whiteouts, opaque directories, files replaced by directories and back,
// hard links, symlinks, xattrs, owners, special modes and devices.
func ociTestLayers(t testing.TB) [][]byte {
	dev := tarEnt{hdr: tar.Header{Name: "dev/zero", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 5, ModTime: testTime, Format: tar.FormatPAX}}
	fifo := tarEnt{hdr: tar.Header{Name: "run/fifo", Typeflag: tar.TypeFifo, Mode: 0o600, ModTime: testTime, Format: tar.FormatPAX}}
	big := strings.Repeat("0123456789abcdef", 200000) // 3.2 MB: several chunks
	l1 := makeTar(t,
		tDir("./", 0o755),
		tDir("etc/", 0o755),
		tFile("etc/hostname", "base\n"),
		tFile("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
		withXattr(tFile("etc/labelled", "has xattrs"), "user.color", "blue"),
		withOwner(tFile("etc/owned", "uid 1234"), 1234, 5678),
		withMode(tFile("etc/setuid", "s"), 0o4755),
		tDir("etc/keep/", 0o700),
		tFile("etc/keep/k1", "k1"),
		tDir("opq/", 0o755),
		tFile("opq/old1", "o1"),
		tDir("opq/sub/", 0o755),
		tFile("opq/sub/old2", "o2"),
		tFile("file2dir", "a file first"),
		tDir("dir2file/", 0o755),
		tDir("dir2file/sub/", 0o755),
		tFile("dir2file/sub/z", "z"),
		tDir("bin/", 0o755),
		withMode(tFile("bin/busybox", big), 0o755),
		tLink("bin/sh", "bin/busybox"),
		tLink("bin/ls", "bin/busybox"),
		tSymlink("bin/cat", "busybox"),
		tSymlink("lib", "usr/lib"),
		tDir("usr/", 0o755),
		tDir("usr/lib/", 0o755),
		tFile("usr/lib/libc.so", strings.Repeat("libc", 3000)),
		tDir("dev/", 0o755),
		dev,
		tDir("run/", 0o755),
		fifo,
		tDir("tmp/", 0o1777),
		tFile("gone-later", "deleted by layer 3"),
		tDir("usr/share/", 0o755),
		tDir("usr/share/man/", 0o755),
		tDir("usr/share/man/cs/", 0o755),
		tDir("usr/share/man/cs/man1/", 0o755),
		tFile("usr/share/man/cs/man1/ls.1", "cs ls"),
		tDir("usr/share/man/man1/", 0o755),
		tFile("usr/share/man/man1/ls.1", "ls"),
	)
	l2 := makeTar(t,
		tDir("etc/", 0o755),
		tFile("etc/.wh.hostname", ""),
		tFile("etc/hostname2", "second\n"),
		// No header for etc/keep/: its 0700 stays.
		tFile("etc/keep/k2", "k2"),
		withXattr(tFile("etc/labelled", "relabelled"), "user.color", "red"),
		tDir("opq/", 0o711),
		tFile("opq/.wh..wh..opq", ""),
		tFile("opq/new", "after opaque"),
		tDir("file2dir/", 0o755),
		tFile("file2dir/inside", "now a directory"),
		tFile("dir2file", "a file now"),
		tDir("bin/", 0o755),
		tFile("bin/.wh.ls", ""),
		tFile("pair-a", "pair"),
		tLink("pair-b", "pair-a"),
	)
	l3 := makeTar(t,
		tFile(".wh.gone-later", ""),
		tFile(".wh.file2dir", ""),
		tDir("dir2file/", 0o750),
		tFile("dir2file/again", "a directory again"),
		tDir("usr/", 0o755),
		tDir("usr/lib/", 0o755),
		tFile("usr/lib/libc.so", "replaced"),
		tFile("pair-a", "pair-a replaced"),
		// umoci writes a directory replaced by a file this way: the file,
		// then whiteouts beneath it, whose parent is no directory any
		// more; they delete nothing.
		tFile("usr/share/man", "a file now"),
		tFile("usr/share/man/.wh.cs", ""),
		// Whiteouts below a lower file and below nothing: no effect.
		tFile("etc/passwd/.wh.shadow", ""),
		tFile("nowhere/deep/.wh.x", ""),
	)
	l4 := makeTar(t,
		tDir("srv/", 0o755),
		tDir("srv/www/", 0o755),
		tFile("srv/www/index.html", strings.Repeat("<p>hello</p>\n", 5000)),
		tFile("file2dir", "a file once more"),
	)
	return [][]byte{l1, l2, l3, l4}
}

// ociTestImage makes the test image with a mix of layer compressions
// umoci understands.
func ociTestImage(t testing.TB) (v1.Image, []*memLayer) {
	tars := ociTestLayers(t)
	layers := []*memLayer{
		newLayer(t, tars[0], "gzip"),
		newLayer(t, tars[1], "none"),
		newLayer(t, tars[2], "gzip"),
		newLayer(t, tars[3], "gzip"),
	}
	var vl []v1.Layer
	for _, l := range layers {
		vl = append(vl, l)
	}
	return newImage(t, vl...), layers
}

// umociOptions says what treecmp compares against umoci's extraction:
// everything but the root directory (a bundle's rootfs is umoci's own) and
// directory mtimes (see compareTrees).
var umociOptions = treecmp.Options{SkipRoot: true, XattrPrefixes: []string{"user.", "trusted."}}

func TestConvertMatchesUmoci(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.SkipShort(t)
	img, _ := ociTestImage(t)
	dir := t.TempDir()
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "v1", img)
	reference := umociUnpack(t, layoutDir, "v1")

	reg := testregistry.Start(t)
	ref := reg + "/test/oci:v1"
	pushImage(t, ref, img)

	cache := filepath.Join(dir, "cache")
	fromRegistry := convertT(t, ref, Options{CacheDir: cache, Export: ExportImage, Verity: true, Insecure: true})
	if fromRegistry.ManifestDigest != digestOf(t, img).String() || len(fromRegistry.Layers) != 4 {
		t.Fatalf("converted %s with %d layers, want %s with 4", fromRegistry.ManifestDigest, len(fromRegistry.Layers), digestOf(t, img))
	}
	for _, l := range fromRegistry.Layers {
		if l.Reused {
			t.Errorf("layer %d reused in a fresh cache", l.Index)
		}
	}
	if len(fromRegistry.Exports) != 1 || fromRegistry.Exports[0].Verity == "" {
		t.Fatalf("exports: %+v", fromRegistry.Exports)
	}
	ex := fromRegistry.Exports[0]
	top := fromRegistry.Layers[3].DiffID
	if filepath.Base(ex.Path) != hexOf(top)+".image.disk" || filepath.Dir(ex.Path) != filepath.Join(cache, "blobs") {
		t.Errorf("image disk %s, want blobs/<top layer diff_id>.image.disk", ex.Path)
	}
	if !strings.HasPrefix(ex.Verity, "dm-verity options: --no-superblock --format=1 -s \"\" --hash=sha256 --data-block-size=512 --hash-block-size=4096 --data-blocks ") {
		t.Errorf("verity line %q", ex.Verity)
	}
	checkVerity(t, ex)

	mnt := mountDisk(t, ex.Path, int64(ex.HashOffset))
	compareTrees(t, reference, mnt, umociOptions, nil)

	// The same image from the layout: same cache, nothing pulled again,
	// the same disk.
	fromLayout := convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache, Export: ExportImage, Verity: true})
	if !fromLayout.Reused || len(fromLayout.Exports) != 1 || !fromLayout.Exports[0].Reused {
		t.Errorf("second conversion of the same manifest: reused %v, exports %+v", fromLayout.Reused, fromLayout.Exports)
	}
	// And into a cache of its own: byte-identical results.
	cache2 := filepath.Join(dir, "cache2")
	fresh := convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache2, Export: ExportImage, Verity: true})
	if fresh.Reused || testutil.FileSHA256(t, fresh.Bootstrap) != testutil.FileSHA256(t, fromRegistry.Bootstrap) ||
		testutil.FileSHA256(t, fresh.Exports[0].Path) != testutil.FileSHA256(t, ex.Path) {
		t.Error("converting from the layout gives other bytes than from the registry")
	}

	// Serving needs only ResolveImage.
	boot, blobs, err := ResolveImage(cache, ref)
	if err != nil || boot != fromRegistry.Bootstrap || blobs != filepath.Join(cache, "blobs") {
		t.Errorf("ResolveImage(%s) = %s, %s, %v", ref, boot, blobs, err)
	}
}

// checkVerity runs veritysetup verify with the printed options line as a
// shell would take it (standard tree bytes).
func checkVerity(t testing.TB, ex Export) {
	t.Helper()
	testutil.RequireTool(t, "veritysetup")
	opts, ok := strings.CutPrefix(ex.Verity, "dm-verity options: ")
	if !ok || !strings.HasSuffix(opts, " "+ex.RootHash) {
		t.Fatalf("verity line %q does not end in the root %s", ex.Verity, ex.RootHash)
	}
	out, err := execOutput("sh", "-c", `veritysetup verify `+opts[:len(opts)-len(ex.RootHash)]+` "$1" "$1" `+ex.RootHash, "sh", ex.Path)
	if err != nil {
		t.Errorf("veritysetup verify %s: %v\n%s", ex.Path, err, out)
	}
}

// TestConvertLayerMode: each layer's own disk mounts and holds exactly the
// layer's content; the whiteouts are there as the plain files the layer
// tar has (a layer disk is the layer, not the image), everything else
// equals umoci's extraction of that layer alone.
func TestConvertLayerMode(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.SkipShort(t)
	_, layers := ociTestImage(t)
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	img := newImage(t, layers[0], layers[1], layers[2], layers[3])
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "v1", img)
	res := convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache, Export: ExportLayer})
	if len(res.Exports) != 4 {
		t.Fatalf("%d layer disks, want 4", len(res.Exports))
	}
	for i, ex := range res.Exports {
		if filepath.Base(ex.Path) != hexOf(res.Layers[i].DiffID)+".layer.disk" || ex.Verity != "" {
			t.Errorf("layer %d disk %s verity %q", i, ex.Path, ex.Verity)
		}
	}
	for _, i := range []int{0, 1} {
		single := newImage(t, layers[i])
		tag := "layer" + itoa(uint64(i))
		writeLayout(t, layoutDir, tag, single)
		reference := umociUnpack(t, layoutDir, tag)
		mnt := mountDisk(t, res.Exports[i].Path, 0)
		compareTrees(t, reference, mnt, umociOptions, isWhiteout)
		// The layer's whiteouts are in its disk as they are in its tar.
		if i == 1 {
			for _, wh := range []string{"etc/.wh.hostname", "opq/.wh..wh..opq", "bin/.wh.ls"} {
				if _, err := os.Lstat(filepath.Join(mnt, wh)); err != nil {
					t.Errorf("layer disk lacks %s: %v", wh, err)
				}
			}
		}
	}
}

// TestConvertMediaTypes: zstd, uncompressed and Docker (schema 2, in a
// manifest list) images of the same tars convert to the same bootstrap and
// disk bytes as the gzip OCI one: same diff_ids, same tars.
func TestConvertMediaTypes(t *testing.T) {
	tars := ociTestLayers(t)
	var gz, zs, none, docker []v1.Layer
	for _, tb := range tars {
		gz = append(gz, newLayer(t, tb, "gzip"))
		zs = append(zs, newLayer(t, tb, "zstd"))
		none = append(none, newLayer(t, tb, "none"))
		docker = append(docker, newLayer(t, tb, "docker-gzip"))
	}
	dir := t.TempDir()
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "gzip", newImage(t, gz...))
	writeLayout(t, layoutDir, "zstd", newImage(t, zs...))
	writeLayout(t, layoutDir, "none", newImage(t, none...))
	dockerImg := mutate.ConfigMediaType(mutate.MediaType(newImage(t, docker...), types.DockerManifestSchema2), types.DockerConfigJSON)
	list := mutate.IndexMediaType(mutateIndex(t, map[string]v1.Image{DefaultPlatform(): dockerImg}), types.DockerManifestList)
	writeLayoutIndex(t, layoutDir, "docker", list)

	a := convertT(t, "oci:"+layoutDir+":gzip", Options{CacheDir: filepath.Join(dir, "a"), Export: ExportImage})
	var b *Result
	for _, tag := range []string{"zstd", "none", "docker"} {
		b = convertT(t, "oci:"+layoutDir+":"+tag, Options{CacheDir: filepath.Join(dir, tag), Export: ExportImage})
		if a.ManifestDigest == b.ManifestDigest {
			t.Fatalf("%s: the images have one manifest", tag)
		}
		if testutil.FileSHA256(t, a.Bootstrap) != testutil.FileSHA256(t, b.Bootstrap) || testutil.FileSHA256(t, a.Exports[0].Path) != testutil.FileSHA256(t, b.Exports[0].Path) {
			t.Errorf("%s and gzip images of the same tars convert to different bytes", tag)
		}
	}
	if b.ManifestDigest != digestOf(t, dockerImg).String() {
		t.Errorf("from the manifest list: %s, want %s", b.ManifestDigest, digestOf(t, dockerImg))
	}
	// The merged bootstrap has one tarfs blob per layer, named by diff_id.
	ri, err := rafs.Open(b.Bootstrap)
	if err != nil {
		t.Fatal(err)
	}
	defer ri.Close()
	if !ri.IsTarfs() || len(ri.Blobs) != 4 {
		t.Fatalf("tarfs %v, %d blobs", ri.IsTarfs(), len(ri.Blobs))
	}
	for i, e := range ri.Blobs {
		if e.ID() != hexOf(b.Layers[i].DiffID) || int64(e.UncompressedSize) != int64(len(tars[i])) {
			t.Errorf("blob %d: id %s size %d, want %s size %d", i, e.ID(), e.UncompressedSize, hexOf(b.Layers[i].DiffID), len(tars[i]))
		}
	}
}

func TestResolveImage(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	layoutDir := filepath.Join(dir, "layout")
	img1 := newImage(t, newLayer(t, makeTar(t, tFile("a", "1")), "gzip"))
	img2 := newImage(t, newLayer(t, makeTar(t, tFile("a", "2")), "gzip"))
	writeLayout(t, layoutDir, "v1", img1)
	writeLayout(t, layoutDir, "v2", img2)
	if _, _, err := ResolveImage(cache, "oci:"+layoutDir+":v1"); err == nil {
		t.Error("resolved an image before any conversion")
	}
	r1 := convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache})
	r2 := convertT(t, "oci:"+layoutDir+":v2", Options{CacheDir: cache})

	// Relative spellings of the layout path name the same image.
	wd, _ := os.Getwd()
	rel, err := filepath.Rel(wd, layoutDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		query string
		want  *Result
	}{
		{"oci:" + layoutDir + ":v1", r1},
		{"oci:" + rel + ":v1", r1},
		{"oci:" + layoutDir + ":v2", r2},
		{r1.ManifestDigest, r1},
		{hexOf(r2.ManifestDigest)[:12], r2},
	} {
		boot, blobs, err := ResolveImage(cache, c.query)
		if err != nil || boot != c.want.Bootstrap || blobs != c.want.BlobDir {
			t.Errorf("ResolveImage(%s) = %s, %s, %v; want %s", c.query, boot, blobs, err, c.want.Bootstrap)
		}
	}
	for _, q := range []string{"oci:" + layoutDir + ":v3", "sha256:" + strings.Repeat("0", 64), "example.com/none:latest"} {
		if _, _, err := ResolveImage(cache, q); err == nil {
			t.Errorf("ResolveImage(%s) found something", q)
		}
	}
	// A missing layer tar makes the image unusable, and says so.
	if err := os.Remove(r1.Layers[0].Blob); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ResolveImage(cache, r1.ManifestDigest); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("ResolveImage with a missing tar: %v", err)
	}
	// Converting again repairs it.
	convertT(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache})
	if _, _, err := ResolveImage(cache, r1.ManifestDigest); err != nil {
		t.Errorf("after reconverting: %v", err)
	}
}

// TestConvertPlatformIndex: from a multi-platform index the asked-for
// platform is taken.
func TestConvertPlatformIndex(t *testing.T) {
	dir := t.TempDir()
	amd := newImage(t, newLayer(t, makeTar(t, tFile("arch", "amd64")), "gzip"))
	arm := newImage(t, newLayer(t, makeTar(t, tFile("arch", "arm64")), "gzip"))
	idx := mutateIndex(t, map[string]v1.Image{"linux/amd64": amd, "linux/arm64": arm})
	layoutDir := filepath.Join(dir, "layout")
	writeLayoutIndex(t, layoutDir, "multi", idx)
	for plat, img := range map[string]v1.Image{"linux/amd64": amd, "linux/arm64": arm} {
		res := convertT(t, "oci:"+layoutDir+":multi", Options{CacheDir: filepath.Join(dir, "cache"), Platform: plat})
		if res.ManifestDigest != digestOf(t, img).String() {
			t.Errorf("platform %s: got manifest %s, want %s", plat, res.ManifestDigest, digestOf(t, img))
		}
	}
	_, err := Convert(context.Background(), "oci:"+layoutDir+":multi", Options{CacheDir: filepath.Join(dir, "cache"), Platform: "linux/s390x"})
	if err == nil || !strings.Contains(err.Error(), "no manifest for platform linux/s390x") {
		t.Errorf("missing platform: %v", err)
	}
}
