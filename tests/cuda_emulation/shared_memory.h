// Where the kernels' __shared__ variables live, so that every block can start with them poisoned.
//
// In the emulation a __shared__ variable is a function-local static (cuda_emulation.h). GCC
// ignores a section attribute on the statics of function templates, which all of this project's
// kernels are, so the variables are found in the symbol table of the emulation's own shared
// object instead: every local static of a function in the kernels' namespaces (cossim_fast,
// self_checks) is a __shared__ variable. Host code in those namespaces keeps its statics at
// namespace scope.
#pragma once

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace cuda_emulation {

struct SharedVariable {
  char* begin;
  size_t size;
};

// Mangled-name prefixes of the local statics of functions in the kernels' namespaces.
inline bool is_kernel_local_static(const char* name) {
  return std::strncmp(name, "_ZZN11cossim_fast", 17) == 0 || std::strncmp(name, "_ZZN11self_checks", 17) == 0;
}

inline std::vector<SharedVariable> find_shared_variables() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&find_shared_variables), &info) == 0 || info.dli_fname == nullptr) {
    throw std::runtime_error("CUDA emulation: dladdr found no shared object holding the kernels");
  }
  const int fd = open(info.dli_fname, O_RDONLY);
  struct stat st {};
  if (fd < 0 || fstat(fd, &st) != 0) throw std::runtime_error(std::string("CUDA emulation: cannot read ") + info.dli_fname);
  void* mapped = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (mapped == MAP_FAILED) throw std::runtime_error(std::string("CUDA emulation: cannot map ") + info.dli_fname);
  const char* file = static_cast<const char*>(mapped);
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(file);
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(file + header->e_shoff);
  std::vector<SharedVariable> found;
  for (int s = 0; s < header->e_shnum; ++s) {
    if (sections[s].sh_type != SHT_SYMTAB) continue;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(file + sections[s].sh_offset);
    const char* names = file + sections[sections[s].sh_link].sh_offset;
    for (size_t i = 0; i < sections[s].sh_size / sizeof(Elf64_Sym); ++i) {
      const Elf64_Sym& symbol = symbols[i];
      if (ELF64_ST_TYPE(symbol.st_info) == STT_OBJECT && symbol.st_size > 0 &&
          is_kernel_local_static(names + symbol.st_name)) {
        found.push_back({static_cast<char*>(info.dli_fbase) + symbol.st_value, static_cast<size_t>(symbol.st_size)});
      }
    }
  }
  munmap(mapped, static_cast<size_t>(st.st_size));
  if (found.empty()) throw std::runtime_error("CUDA emulation: no __shared__ variable in the symbol table (stripped?)");
  return found;
}

inline const std::vector<SharedVariable>& shared_variables() {
  static const std::vector<SharedVariable> variables = find_shared_variables();
  return variables;
}

// Whether [address, address + size) lies inside one __shared__ variable.
inline bool is_shared(const void* address, size_t size) {
  const char* p = static_cast<const char*>(address);
  for (const SharedVariable& v : shared_variables()) {
    if (p >= v.begin && p + size <= v.begin + v.size) return true;
  }
  return false;
}

// Shared memory holds garbage when a CUDA block starts: here 0xff bytes (NaN in every float
// type, -1 in every integer), so a kernel that reads what its block did not write goes wrong.
inline void poison_shared_memory() {
  for (const SharedVariable& v : shared_variables()) std::memset(v.begin, 0xff, v.size);
}

}  // namespace cuda_emulation
