// Command mkoci makes OCI images for the example and benchmark scripts:
// one layer per directory given (whiteout files such as .wh.NAME are
// copied as they are), or a generated multi-layer image of a given size.
// It writes an OCI image layout and/or pushes to a registry.
//
//	go run ./scripts/mkoci -layout out/ -tag v1 rootfs/ changes/
//	go run ./scripts/mkoci -synth-mb 300 -push 127.0.0.1:5000/bench:v1 -insecure
package main

import (
	"archive/tar"
	"bufio"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

func main() {
	layoutDir := flag.String("layout", "", "write an OCI image layout to `DIR` (created or appended to)")
	tag := flag.String("tag", "latest", "tag of the image in the layout")
	push := flag.String("push", "", "push the image to registry `REF`")
	insecure := flag.Bool("insecure", false, "plain HTTP to the registry")
	compression := flag.String("compression", "gzip", "layer compression: gzip, zstd or none")
	synthMB := flag.Int("synth-mb", 0, "generate a 3-layer image of about `N` MiB of files instead of reading directories")
	seed := flag.Uint64("seed", 1, "seed of the generated image")
	work := flag.String("work", "", "`DIR` for the layer files (default: a temporary directory, removed)")
	flag.Parse()
	if *layoutDir == "" && *push == "" {
		fatalf("give -layout DIR and/or -push REF")
	}
	if (*synthMB > 0) == (flag.NArg() > 0) {
		fatalf("give either directories (one per layer) or -synth-mb N")
	}

	dir := *work
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "mkoci-"); err != nil {
			fatalf("%v", err)
		}
		defer os.RemoveAll(dir)
	}
	var tars []string
	if *synthMB > 0 {
		tars = synthesize(dir, int64(*synthMB)<<20, *seed)
	} else {
		for i, src := range flag.Args() {
			p := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
			writeFile(p, func(w io.Writer) error { return tarDir(src, w) })
			tars = append(tars, p)
		}
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, err := img.ConfigFile()
	check(err)
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: time.Unix(1700000000, 0).UTC()}
	img, err = mutate.ConfigFile(img, cfg)
	check(err)
	for _, t := range tars {
		blob, mt := compress(t, *compression)
		l := &fileLayer{blob: blob, tar: t, mt: mt, digest: fileHash(blob), diffID: fileHash(t)}
		img, err = mutate.Append(img, mutate.Addendum{Layer: l, MediaType: mt})
		check(err)
	}
	d, err := img.Digest()
	check(err)

	if *layoutDir != "" {
		p, err := layout.FromPath(*layoutDir)
		if err != nil {
			p, err = layout.Write(*layoutDir, empty.Index)
			check(err)
		}
		check(p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": *tag})))
		fmt.Printf("oci:%s:%s %s\n", *layoutDir, *tag, d)
	}
	if *push != "" {
		var opts []name.Option
		if *insecure {
			opts = append(opts, name.Insecure)
		}
		ref, err := name.ParseReference(*push, opts...)
		check(err)
		check(remote.Write(ref, img))
		fmt.Printf("%s %s\n", ref.Name(), d)
	}
}

// fileLayer is a layer whose blob and tar are files; unlike tarball's
// layers it can be uncompressed (blob == tar).
type fileLayer struct {
	blob, tar      string
	mt             types.MediaType
	digest, diffID v1.Hash
}

func (l *fileLayer) Digest() (v1.Hash, error)             { return l.digest, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)             { return l.diffID, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)   { return os.Open(l.blob) }
func (l *fileLayer) Uncompressed() (io.ReadCloser, error) { return os.Open(l.tar) }
func (l *fileLayer) MediaType() (types.MediaType, error)  { return l.mt, nil }
func (l *fileLayer) Size() (int64, error) {
	st, err := os.Stat(l.blob)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func fileHash(p string) v1.Hash {
	f, err := os.Open(p)
	check(err)
	defer f.Close()
	h, _, err := v1.SHA256(f)
	check(err)
	return h
}

// compress writes the compressed blob of a tar next to it.
func compress(tarPath, how string) (string, types.MediaType) {
	switch how {
	case "none":
		return tarPath, types.OCIUncompressedLayer
	case "gzip":
		out := tarPath + ".gz"
		writeFile(out, func(w io.Writer) error {
			zw, err := gzip.NewWriterLevel(w, gzip.DefaultCompression)
			if err != nil {
				return err
			}
			return copyClose(zw, tarPath)
		})
		return out, types.OCILayer
	case "zstd":
		out := tarPath + ".zst"
		writeFile(out, func(w io.Writer) error {
			zw, err := zstd.NewWriter(w)
			if err != nil {
				return err
			}
			return copyClose(zw, tarPath)
		})
		return out, types.OCILayerZStd
	}
	fatalf("unknown compression %q", how)
	return "", ""
}

func copyClose(w io.WriteCloser, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(w, f); err != nil {
		return err
	}
	return w.Close()
}

// tarDir writes the tree under root as a layer tar: PAX headers with
// owners, modes, mtimes and user./trusted. xattrs; hard links as links.
func tarDir(root string, w io.Writer) error {
	tw := tar.NewWriter(w)
	seen := map[[2]uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		target := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return err
		}
		hdr.Name, hdr.Format = filepath.ToSlash(rel), tar.FormatPAX
		hdr.Uname, hdr.Gname = "", ""
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		if fi.IsDir() {
			hdr.Name += "/"
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{uint64(st.Dev), st.Ino}
			if first, ok := seen[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				seen[key] = hdr.Name
			}
		}
		if hdr.PAXRecords, err = xattrRecords(p); err != nil {
			return err
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeReg && hdr.Size > 0 {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := io.Copy(tw, f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// xattrRecords are p's user. and trusted. xattrs as PAX records.
func xattrRecords(p string) (map[string]string, error) {
	x, err := treecmp.Xattrs(p, []string{"user.", "trusted."})
	if err != nil || len(x) == 0 {
		return nil, err
	}
	recs := make(map[string]string, len(x))
	for k, v := range x {
		recs["SCHILY.xattr."+k] = v
	}
	return recs, nil
}

// synthesize writes three layer tars that look like a real image: a base
// of many small text-like files and compressible binaries, a dependency
// layer of medium files, and an application layer of a few large files
// (some incompressible) that also deletes and replaces base files.
func synthesize(dir string, total int64, seed uint64) []string {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	mtime := time.Unix(1700000000, 0)
	words := strings.Fields("the of and to in is for on that with as it by this be are from at or an " +
		"config value error return func package import struct type string int uint64 nil true false " +
		"usr lib share doc bin etc var log cache data http server client request response buffer")
	text := func(n int64) []byte {
		var b strings.Builder
		for int64(b.Len()) < n {
			b.WriteString(words[r.IntN(len(words))])
			if r.IntN(12) == 0 {
				b.WriteByte('\n')
			} else {
				b.WriteByte(' ')
			}
		}
		return []byte(b.String()[:n])
	}
	binary := func(n int64, randomShare int) []byte {
		b := make([]byte, n)
		for i := int64(0); i < n; i += 4096 {
			end := min(i+4096, n)
			if r.IntN(100) < randomShare {
				for j := i; j < end; j++ {
					b[j] = byte(r.Uint32())
				}
			} else {
				copy(b[i:end], text(end-i))
			}
		}
		return b
	}
	type file struct {
		name string
		data []byte
	}
	layer := func(name string, files func(emit func(file))) string {
		p := filepath.Join(dir, name+".tar")
		writeFile(p, func(w io.Writer) error {
			tw := tar.NewWriter(w)
			dirs := map[string]bool{}
			var err error
			files(func(f file) {
				if err != nil {
					return
				}
				for d := filepath.Dir(f.name); d != "." && !dirs[d]; d = filepath.Dir(d) {
					dirs[d] = true
				}
				hdr := &tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(f.data)), ModTime: mtime, Format: tar.FormatPAX}
				if strings.Contains(f.name, "/bin/") {
					hdr.Mode = 0o755
				}
				if err = tw.WriteHeader(hdr); err == nil {
					_, err = tw.Write(f.data)
				}
			})
			if err != nil {
				return err
			}
			// Directory entries after their files are valid tar, but
			// put them in a sorted trailer so parents come first.
			names := make([]string, 0, len(dirs))
			for d := range dirs {
				names = append(names, d)
			}
			sort.Strings(names)
			for _, d := range names {
				if err := tw.WriteHeader(&tar.Header{Name: d + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
					return err
				}
			}
			return tw.Close()
		})
		return p
	}
	var baseNames []string
	base := layer("base", func(emit func(file)) {
		for size := int64(0); size < total*50/100; {
			var f file
			if r.IntN(10) == 0 {
				f = file{fmt.Sprintf("usr/lib/pkg%03d/bin/tool%05d", r.IntN(200), r.IntN(100000)), binary(64<<10+r.Int64N(1<<20), 30)}
			} else {
				f = file{fmt.Sprintf("usr/share/pkg%03d/doc/file%05d.txt", r.IntN(200), r.IntN(100000)), text(512 + r.Int64N(16<<10))}
			}
			baseNames = append(baseNames, f.name)
			size += int64(len(f.data))
			emit(f)
		}
	})
	deps := layer("deps", func(emit func(file)) {
		for size := int64(0); size < total*35/100; {
			f := file{fmt.Sprintf("opt/deps/lib%03d/mod%04d.so", r.IntN(50), r.IntN(10000)), binary(100<<10+r.Int64N(4<<20), 40)}
			size += int64(len(f.data))
			emit(f)
		}
	})
	app := layer("app", func(emit func(file)) {
		for size := int64(0); size < total*15/100; {
			f := file{fmt.Sprintf("app/data/blob%03d.bin", r.IntN(1000)), binary(4<<20+r.Int64N(16<<20), 90)}
			size += int64(len(f.data))
			emit(f)
		}
		for i := 0; i < 50 && i < len(baseNames); i++ {
			n := baseNames[r.IntN(len(baseNames))]
			if r.IntN(2) == 0 {
				emit(file{filepath.Join(filepath.Dir(n), ".wh."+filepath.Base(n)), nil})
			} else {
				emit(file{n, text(1024)})
			}
		}
	})
	return []string{base, deps, app}
}

func writeFile(p string, fill func(io.Writer) error) {
	f, err := os.Create(p)
	check(err)
	bw := bufio.NewWriterSize(f, 1<<20)
	check(fill(bw))
	check(bw.Flush())
	check(f.Close())
}

func check(err error) {
	if err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mkoci: "+format+"\n", args...)
	os.Exit(1)
}
