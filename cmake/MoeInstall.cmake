# Install rules, the conformance tool, and the packages for out-of-tree
# router plugins. Included at the end of the top-level CMakeLists.txt.
#
#   cmake --install build --prefix P
#
#   P/bin/moehost, P/bin/moe-conform
#   P/lib/moe/plugins/<router>.so          built-in routers; moehost looks in <its bin>/../lib/moe/plugins
#   P/include/moe/*.h                      the SDK (installed by core/CMakeLists.txt)
#   P/<libdir>/cmake/MoeRoutingBench/      find_package(MoeRoutingBench): MoeRoutingBench::sdk,
#                                          moe_add_router_plugin(), MoeRoutingBench::moehost / ::moe-conform
#   P/<libdir>/pkgconfig/moe-routing-bench.pc   Cflags -I${includedir}; variable plugindir
#   P/share/doc/..., P/share/moe-routing-bench/examples/   the plugin docs and the worked example
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# moehost looks for installed plugins in <bin>/../lib/moe/plugins, whatever
# CMAKE_INSTALL_LIBDIR is (lib64, lib/x86_64-linux-gnu).
set(MOE_PACKAGE_PLUGIN_DIR lib/moe/plugins)

# ---------------------------------------------------------------------------
# moe-conform: the contract checker (core/tools/moe_conform.c). It loads
# plugins with the host's own loader, compiled in here so the tool needs
# none of the host's dependencies.
# ---------------------------------------------------------------------------
if(NOT TARGET moe-conform AND EXISTS ${PROJECT_SOURCE_DIR}/core/tools/moe_conform.c)
  add_executable(moe-conform
    ${PROJECT_SOURCE_DIR}/core/tools/moe_conform.c
    ${PROJECT_SOURCE_DIR}/core/tools/conform_checks.c
    ${PROJECT_SOURCE_DIR}/core/tools/conform_exec.c
    ${PROJECT_SOURCE_DIR}/core/runtime/plugin_loader.c)
  target_include_directories(moe-conform PRIVATE ${PROJECT_SOURCE_DIR}/core ${PROJECT_SOURCE_DIR}/core/include)
  target_compile_definitions(moe-conform PRIVATE MOE_VERSION="${PROJECT_VERSION}")
  target_link_libraries(moe-conform PRIVATE ${CMAKE_DL_LIBS} m)
  if(MOE_WITH_CUDA)
    # The --device cuda checks: device memory, a stream, the cuda table.
    target_sources(moe-conform PRIVATE ${PROJECT_SOURCE_DIR}/core/tools/conform_cuda.c)
    target_compile_definitions(moe-conform PRIVATE MOE_CONFORM_CUDA=1)
    target_link_libraries(moe-conform PRIVATE CUDA::cudart_static)
  endif()
endif()
if(TARGET moe-conform)
  install(TARGETS moe-conform RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()

# ---------------------------------------------------------------------------
# Built-in plugins: moe_add_router_plugin installs them into
# MOE_INSTALL_PLUGIN_DIR (<libdir>/moe/plugins). Where libdir is not "lib",
# install them under lib/moe/plugins as well, where moehost looks.
# ---------------------------------------------------------------------------
if(NOT MOE_INSTALL_PLUGIN_DIR STREQUAL MOE_PACKAGE_PLUGIN_DIR)
  set(_moe_plugin_targets)
  get_property(_moe_plugin_dirs DIRECTORY ${PROJECT_SOURCE_DIR}/plugins PROPERTY SUBDIRECTORIES)
  foreach(_d ${PROJECT_SOURCE_DIR}/plugins ${_moe_plugin_dirs})
    get_property(_ts DIRECTORY ${_d} PROPERTY BUILDSYSTEM_TARGETS)
    foreach(_t ${_ts})
      if(_t MATCHES "^moe_plugin_")
        list(APPEND _moe_plugin_targets ${_t})
      endif()
    endforeach()
  endforeach()
  if(_moe_plugin_targets)
    install(TARGETS ${_moe_plugin_targets} LIBRARY DESTINATION ${MOE_PACKAGE_PLUGIN_DIR})
  endif()
  message(STATUS "Router plugins install into ${MOE_INSTALL_PLUGIN_DIR} and ${MOE_PACKAGE_PLUGIN_DIR}")
endif()

# ---------------------------------------------------------------------------
# CMake package: find_package(MoeRoutingBench)
# ---------------------------------------------------------------------------
set(MOE_CMAKE_PACKAGE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/MoeRoutingBench)
set(MOE_PACKAGE_INCLUDE_DIR ${CMAKE_INSTALL_INCLUDEDIR})
set(MOE_PACKAGE_BIN_DIR ${CMAKE_INSTALL_BINDIR})
set(_moe_pkg ${CMAKE_BINARY_DIR}/moe-package)
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/MoeRoutingBenchConfig.cmake.in
  ${_moe_pkg}/MoeRoutingBenchConfig.cmake
  INSTALL_DESTINATION ${MOE_CMAKE_PACKAGE_DIR}
  PATH_VARS MOE_PACKAGE_INCLUDE_DIR MOE_PACKAGE_BIN_DIR MOE_PACKAGE_PLUGIN_DIR)
# Plugins are bound by the versioned ABI symbol, not by the package version:
# any 0.x SDK builds plugins that any 0.x host of the same ABI loads.
write_basic_package_version_file(${_moe_pkg}/MoeRoutingBenchConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
configure_file(${CMAKE_CURRENT_LIST_DIR}/MoeRoutingBenchPlugin.cmake.in
  ${_moe_pkg}/MoeRoutingBenchPlugin.cmake @ONLY)
install(FILES
  ${_moe_pkg}/MoeRoutingBenchConfig.cmake
  ${_moe_pkg}/MoeRoutingBenchConfigVersion.cmake
  ${_moe_pkg}/MoeRoutingBenchPlugin.cmake
  DESTINATION ${MOE_CMAKE_PACKAGE_DIR})

# ---------------------------------------------------------------------------
# pkg-config: written at install time, so `cmake --install --prefix P`
# records P whatever prefix the build was configured with.
# ---------------------------------------------------------------------------
# The values below reach the install script, which expands ${...}: \\\${prefix}
# leaves the text ${prefix} in the .pc file.
foreach(_v INCLUDEDIR BINDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${_v}}")
    set(_moe_pc_${_v} "${CMAKE_INSTALL_${_v}}")
  else()
    set(_moe_pc_${_v} "\\\${prefix}/${CMAKE_INSTALL_${_v}}")
  endif()
endforeach()
install(CODE "
  get_filename_component(MOE_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\" ABSOLUTE)
  set(MOE_PC_INCLUDEDIR \"${_moe_pc_INCLUDEDIR}\")
  set(MOE_PC_BINDIR \"${_moe_pc_BINDIR}\")
  set(MOE_PC_PLUGINDIR \"\\\${prefix}/${MOE_PACKAGE_PLUGIN_DIR}\")
  set(MOE_PC_VERSION \"${PROJECT_VERSION}\")
  configure_file(\"${CMAKE_CURRENT_LIST_DIR}/moe-routing-bench.pc.in\" \"${_moe_pkg}/moe-routing-bench.pc\" @ONLY)
  file(INSTALL DESTINATION \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}/pkgconfig\" TYPE FILE
       FILES \"${_moe_pkg}/moe-routing-bench.pc\")
")

# ---------------------------------------------------------------------------
# Documentation and the worked example, for users of an installed SDK.
# ---------------------------------------------------------------------------
foreach(_doc plugins.md writing-a-router.md)
  if(EXISTS ${PROJECT_SOURCE_DIR}/docs/${_doc})
    install(FILES ${PROJECT_SOURCE_DIR}/docs/${_doc} DESTINATION ${CMAKE_INSTALL_DOCDIR})
  endif()
endforeach()
if(EXISTS ${PROJECT_SOURCE_DIR}/examples)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/examples/ DESTINATION ${CMAKE_INSTALL_DATADIR}/moe-routing-bench/examples)
endif()
